"""``python -m train causal-lm``: instruction-tune a Flax causal LM with VeRA on every linear layer.

The default is SmolLM2-135M-Instruct (converted from its GGUF, `train.models.gguf_llama`) on the packaged
chatterbot question/answer pairs, each formatted with the model's chat template and scored on the
answer tokens only. One shared A/B, sized by the largest adapted layer, serves q/k/v/o/gate/up/down of
all decoder blocks. The job reports held-out perplexity and greedy answers to a few held-out questions
before and after tuning, and writes the same run directory as classification (metrics, curves,
checkpoints for resume, the adapter in vera_jax and PEFT formats, summary.json).
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import jax
import numpy as np

import vera_jax
from train.engine import chat_data
from train.engine import data as data_lib
from train.engine.errors import RunError
from train.engine.evaluation import evaluate
from train.engine.loop import Trainees, fit
from train.engine.metrics import directory_bytes
from train.engine.run import Prepared, locked_run, publish, save_adapters, start
from train.models.load import check_positions, check_source, load_causal_lm
from train.options import CAUSAL_LM, CAUSAL_LM_DEFAULTS, Options, add_options, from_args
from vera_jax.host import to_host

__all__ = ["run", "prepare", "add_arguments", "command", "lora_parameters"]

LORA_RANK = 64  # the LoRA the parameter count is compared with


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, CAUSAL_LM, CAUSAL_LM_DEFAULTS)


def command(args: argparse.Namespace) -> None:
    run(from_args(args, CAUSAL_LM_DEFAULTS))


def lora_parameters(params, config: vera_jax.VeraConfig, rank: int) -> int:
    """What LoRA of ``rank`` on the same layers would train: rank x (in + out) per layer (each layer of a stack)."""
    return sum(rank * (layer.in_features + layer.out_features) * (layer.layers or 1)
               for layer in vera_jax.find_layers(params, config))


def prepare(options: Options) -> Prepared:
    """Load the question/answer splits, check the positions, load the model, check its chat template, encode both
    splits."""
    check_source(options.model.name)
    splits = data_lib.load_splits(options.data, options.optim.batch_size)
    check_positions(options, ("max_length", "max_new_tokens"))
    model, tokenizer = load_causal_lm(options.model.name, options.model.base_dtype,
                                      options.data.max_length + options.run.max_new_tokens,
                                      backend=options.model.backend, scan_remat=options.model.scan_remat)
    chat_data.use_chat_template(tokenizer, options.data.chat_template, options.model.name)
    if tokenizer.pad_token is None:  # GPT-2 and others: padding is masked out, any token will do
        tokenizer.pad_token = tokenizer.eos_token
    train_data, test_data = (chat_data.encode_chat(split, tokenizer, options.data.max_length)
                             for split in (splits.train, splits.test))
    return Prepared(model, tokenizer, train_data, test_data, tokenizer.pad_token_id, splits.test)


def _answers(model, tokenizer, params, questions: list[str], options: Options) -> list[str]:
    """Greedy answers to ``questions`` from the model with ``params``, decoded without special tokens.

    A prompt longer than ``--max-length`` keeps its last tokens (where the assistant's turn begins), so
    prompt and answer stay within the ``max_length + max_new_tokens`` positions the model was loaded with.
    """
    prompts = [tokenizer(chat_data.prompt_text(tokenizer, q), add_special_tokens=False)["input_ids"][
        -options.data.max_length:] for q in questions]
    ids, mask = chat_data.left_padded(prompts, tokenizer.pad_token_id)
    out = model.generate(ids, attention_mask=mask, params=params, max_new_tokens=options.run.max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new = np.asarray(out.sequences)[:, ids.shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def _peak_memory() -> dict:
    """The accelerator's peak bytes in use where the backend reports it, and the process's peak RSS."""
    stats = jax.local_devices()[0].memory_stats() or {}
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return {"device_peak_bytes": stats.get("peak_bytes_in_use"),
            "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale}


@locked_run
def run(options: Options) -> dict:
    """Run the job described by ``options`` and return the summary it also writes to summary.json."""
    started = time.perf_counter()
    if options.data.task != "causal-lm":
        raise RunError(f"python -m train causal-lm trains a causal LM, not --task {options.data.task!r}.")
    setup = start(options, prepare)
    model, tokenizer, params = setup.model, setup.job.tokenizer, setup.params
    trainable_params, all_params = vera_jax.count_parameters(params, setup.adapter)
    lora_params = lora_parameters(params, setup.adapter.config, LORA_RANK)
    if setup.primary:
        print(f"LoRA r={LORA_RANK} on the same layers would train {lora_params:,d} "
              f"({lora_params / trainable_params:.0f}x)")

    logits_fn = setup.logits()
    test_split = setup.job.test_split
    questions = list(test_split["text"][: options.run.answers])
    trained = fit(setup.ctx, Trainees(("vera",)), setup.adapter, logits_fn, setup.log,
                  checkpoints=setup.checkpoints, meta=setup.meta(), hoist=setup.hoist)
    adapter = trained.adapter
    setup.checkpoints.close()
    # "Before": the adapter as initialised (the base model itself with the default --b-initial 0), measured after
    # training, so that training starts at once and a resumed run does not measure it again.
    _, log_ppl_before = evaluate(setup.ctx, setup.adapter, logits_fn)
    answers_before = _answers(model, tokenizer, params, questions, options)
    token_accuracy, log_ppl_after = evaluate(setup.ctx, adapter, logits_fn)
    setup.log.write(run="vera", step=setup.total_steps, test_loss=log_ppl_after, test_accuracy=token_accuracy)
    answers_after = _answers(model, tokenizer, vera_jax.merge(params, to_host(adapter)), questions, options)
    adapter_dir = save_adapters(setup, adapter, "CAUSAL_LM")

    summary = {
        "model": options.model.name, "backend": options.model.backend, "dataset": options.data.dataset,
        "base_dtype": options.model.base_dtype, "scan_remat": getattr(model, "scan_remat", None),
        "path": options.model.path, "path_detail": setup.path_detail, "mesh": dict(setup.ctx.mesh.shape),
        "steps": setup.total_steps, "train_examples": len(setup.job.train_data),
        "test_examples": len(setup.job.test_data),
        "scored_test_tokens": int(sum(row.sum() for row in setup.job.test_data.labels)),
        "perplexity_before": math.exp(log_ppl_before), "perplexity_after": math.exp(log_ppl_after),
        "test_token_accuracy": token_accuracy, "trainable_params": trainable_params, "all_params": all_params,
        f"lora_r{LORA_RANK}_params": lora_params, "adapter_bytes": directory_bytes(adapter_dir),
        "tokens_per_second": trained.tokens_per_second, **_peak_memory(),
        "answers": [{"question": q, "reference": r, "before": b, "after": a} for q, r, b, a in
                    zip(questions, test_split["label"][: options.run.answers], answers_before, answers_after)],
    }
    summary["wall_seconds"] = time.perf_counter() - started
    report = _report(summary, vera_jax.parameter_report(params, setup.adapter), setup.out)
    publish(setup.out, summary, setup.log, report)
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
