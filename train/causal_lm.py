"""``python -m train causal-lm``: instruction-tune a Flax causal LM with VeRA on every linear layer.

The default is SmolLM2-135M-Instruct (converted from its GGUF, `train.gguf_llama`) on the packaged
chatterbot question/answer pairs, each formatted with the model's chat template and scored on the
answer tokens only. One shared A/B, sized by the largest adapted layer, serves q/k/v/o/gate/up/down of
all decoder blocks. The job reports held-out perplexity and greedy answers to a few held-out questions
before and after tuning, and writes the same run directory as classification (metrics, curves,
checkpoints for resume, the adapter in vera_jax and PEFT formats, summary.json).
"""

from __future__ import annotations

import math
import resource
import sys
import time
from pathlib import Path

import jax
import numpy as np

import vera_jax
from train import chat_data
from train import data as data_lib
from train import mesh as mesh_lib
from train import steps
from train.checkpoints import RunCheckpoints
from train.metrics import MetricsLog, directory_bytes
from train.model import load_causal_lm
from train.options import CAUSAL_LM_DEFAULTS, Options, parse_options
from train.runner import (RunError, evaluate, fit, init_distributed, make_context, output_dir, publish,
                          recipe_meta, resolve_strategy, save_adapters, vera_setup)

__all__ = ["run", "parse_args"]

LORA_RANK = 64  # the LoRA the parameter count is compared with


def parse_args(argv) -> Options:
    return parse_options(argv, CAUSAL_LM_DEFAULTS, prog="python -m train causal-lm")


def _answers(model, tokenizer, params, questions: list[str], options: Options) -> list[str]:
    """Greedy answers to ``questions`` from the model with ``params``, decoded without special tokens.

    A prompt longer than ``--max-length`` keeps its last tokens (where the assistant's turn begins), so
    prompt and answer stay within the ``max_length + max_new_tokens`` positions the model was loaded with.
    """
    prompts = [tokenizer(chat_data.prompt_text(tokenizer, q), add_special_tokens=False)["input_ids"][
        -options.max_length:] for q in questions]
    ids, mask = chat_data.left_padded(prompts, tokenizer.pad_token_id)
    out = model.generate(ids, attention_mask=mask, params=params, max_new_tokens=options.max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new = np.asarray(out.sequences)[:, ids.shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def _peak_memory() -> dict:
    """The accelerator's peak bytes in use where the backend reports it, and the process's peak RSS."""
    stats = jax.local_devices()[0].memory_stats() or {}
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return {"device_peak_bytes": stats.get("peak_bytes_in_use"),
            "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale}


def run(options: Options) -> dict:
    """Run the job described by ``options`` and return the summary it also writes to summary.json."""
    started = time.perf_counter()
    if options.task != "causal-lm":
        raise RunError(f"python -m train causal-lm trains a causal LM; --task {options.task!r} belongs to "
                       "`python -m train`.")
    init_distributed(options)
    out = output_dir(options.output_dir)
    mesh = mesh_lib.make_mesh(options.mesh, options.batch_size)
    train_split, test_split = data_lib.load_splits(options)
    model, tokenizer = load_causal_lm(options.model, options.base_dtype, options.max_length + options.max_new_tokens)
    chat_data.use_chat_template(tokenizer, options.chat_template, options.model)
    if tokenizer.pad_token is None:  # GPT-2 and others: padding is masked out, any token will do
        tokenizer.pad_token = tokenizer.eos_token
    positions = getattr(model.config, "max_position_embeddings", None) or model.config.n_positions
    if options.max_length + options.max_new_tokens > positions:
        raise RunError(f"--max-length {options.max_length} plus --max-new-tokens {options.max_new_tokens} exceeds "
                       f"the {positions} positions of {options.model!r}; lower them.")
    params = model.params
    config, initial = vera_setup(options, params, model.config.model_type)
    train_data = chat_data.encode_chat(train_split, tokenizer, options.max_length)
    test_data = chat_data.encode_chat(test_split, tokenizer, options.max_length)
    key = vera_jax.projection_key(config)
    projections = vera_jax.init_projections(params, key, config)
    strategy = resolve_strategy(options, model, config, projections)
    ctx = make_context(options, mesh, params, projections, key, train_data, test_data, tokenizer.pad_token_id)
    primary = jax.process_index() == 0
    trainable_params, all_params = vera_jax.count_parameters(params, config)
    lora_params = vera_jax.lora_parameters(params, config, LORA_RANK)
    if primary:
        print(vera_jax.parameter_report(params, config))
        print(f"LoRA r={LORA_RANK} on the same layers would train {lora_params:,d} "
              f"({lora_params / trainable_params:.0f}x)")

    logits_fn = steps.vera_logits(model, strategy)
    questions = list(test_split["text"][: options.answers])
    _, log_ppl_before = evaluate(ctx, initial, logits_fn)
    answers_before = _answers(model, tokenizer, params, questions, options)
    checkpoints = RunCheckpoints(out / "checkpoints", options.keep_checkpoints)
    log = MetricsLog(out / "metrics.jsonl", checkpoints.latest_step() or 0, enabled=primary)
    trainable, tokens_per_second = fit(ctx, "vera", initial, logits_fn, log, checkpoints, recipe_meta(ctx, key))
    checkpoints.close()
    token_accuracy, log_ppl_after = evaluate(ctx, trainable, logits_fn)
    log.write(run="vera", step=ctx.total_steps, test_loss=log_ppl_after, test_accuracy=token_accuracy)
    host_trainable = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), trainable)
    answers_after = _answers(model, tokenizer, vera_jax.merge(params, host_trainable, projections), questions,
                             options)
    adapter_dir = save_adapters(out, ctx, config, trainable, key, params, projections, "CAUSAL_LM")

    summary = {
        "model": options.model, "dataset": options.dataset, "base_dtype": options.base_dtype,
        "strategy": options.strategy, "mesh": dict(mesh.shape), "steps": ctx.total_steps,
        "train_examples": len(train_data), "test_examples": len(test_data),
        "scored_test_tokens": int(sum(row.sum() for row in test_data.labels)),
        "perplexity_before": math.exp(log_ppl_before), "perplexity_after": math.exp(log_ppl_after),
        "test_token_accuracy": token_accuracy, "trainable_params": trainable_params, "all_params": all_params,
        f"lora_r{LORA_RANK}_params": lora_params, "adapter_bytes": directory_bytes(adapter_dir),
        "tokens_per_second": tokens_per_second, **_peak_memory(),
        "answers": [{"question": q, "reference": r, "before": b, "after": a} for q, r, b, a in
                    zip(questions, test_split["label"][: options.answers], answers_before, answers_after)],
    }
    summary["wall_seconds"] = time.perf_counter() - started
    publish(out, summary, log, _report(summary, vera_jax.parameter_report(params, config), out))
    return summary


def _report(summary: dict, parameters: str, out: Path) -> str:
    lines = [f"held-out perplexity  {summary['perplexity_before']:.3f} -> {summary['perplexity_after']:.3f} "
             f"({summary['scored_test_tokens']:,d} answer tokens)",
             parameters,
             f"LoRA r={LORA_RANK} would train {summary[f'lora_r{LORA_RANK}_params']:,d} parameters",
             f"adapter on disk      {summary['adapter_bytes']:,d} bytes ({out / 'adapter'})",
             f"wall time            {summary['wall_seconds']:.1f} s",
             f"training throughput  {summary['tokens_per_second']:,.0f} tokens/s"]
    for answer in summary["answers"]:
        lines += [f"Q: {answer['question']}", f"   before: {answer['before']}", f"   after:  {answer['after']}",
                  f"   reference: {answer['reference']}"]
    lines.append(f"run directory        {out}")
    return "\n".join(lines)
