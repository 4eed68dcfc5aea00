"""The step-time benchmark of ``python -m train bench``, as `train.bench_flags.BENCH` describes it."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

import vera_jax
from train.bench import job, startup
from train.bench import nnx as nnx_bench
from train.bench.compiled import training_step
from train.bench_flags import WORKLOADS, BenchError
from train.engine.metrics import write_json
from train.models.load import lacks_torch_weights, load_causal_lm, load_classifier, model_source
from vera_jax.intercept import intercept_layers
from vera_jax.paths import flatten, module_paths, split_leaf
from vera_jax.timing import time_in_rounds

__all__ = ["command", "bench", "FloorScale"]

VERA_VARIANTS = ("merged", "activation", "activation-lean", "auto")
EMBEDDING_MODULES = ("embeddings", "embed_tokens", "wte")  # BERT-likes, Llama-likes, GPT-2


def command(args: argparse.Namespace) -> None:
    if args.startup or args.job:
        results = startup.measure_startup() if args.startup else job.job_bench(
            args.job_flags, args.seeds, job.LoraRecipe(args.lora_rank, args.lora_lr), tuple(args.peers))
        if args.json:
            write_json(args.json, results)
        return
    for name, value in WORKLOADS[args.workload].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.base_dtype != "float32" and args.task != "causal-lm":
        raise BenchError("--base-dtype bfloat16 is measured on the causal-LM workload (--workload smollm2).")
    bench(args)


def _embeddings_module(params) -> str:
    paths = [p for p in module_paths(flatten(params)) if split_leaf(p)[1] in EMBEDDING_MODULES]
    if not paths:
        raise ValueError(f"The floor scales the output of a module named one of {EMBEDDING_MODULES}; this model "
                         "has none.")
    return paths[0]


@struct.dataclass
class FloorScale:
    """The floor's trainable: a vector scaling the embedding output (a tiny struct for
    `train.bench.compiled.training_step`)."""

    trainable: jax.Array


def _floor_logits(model, embeddings: str) -> Callable:
    """The frozen model with a trainable vector scaling the embedding output: gradients through every layer."""

    def logits(params, scale: FloorScale, batch, rng):
        def scaled(call):
            out = call.run()
            return out * (1.0 + scale.trainable).astype(out.dtype)

        with intercept_layers({embeddings}, scaled):
            return model.logits(params, batch, rng)

    return logits


def dense_products(tokens: int, hidden: int, intermediate: int, rounds: int) -> dict:
    """The floor under every comparison with PyTorch: the model's dense products, (tokens, hidden) @ (hidden,
    hidden) and (tokens, hidden) @ (hidden, intermediate), in float32 with XLA and with PyTorch, timed in rounds.

    Returns ``{"shapes", "median_seconds" {"xla MxKxN", "torch MxKxN"}, "torch_speedup"}`` (XLA's time over
    PyTorch's, the geometric mean over the shapes).
    """
    import torch

    shapes = [(tokens, hidden, hidden), (tokens, hidden, intermediate)]
    runners, rng, product = {}, np.random.default_rng(0), jax.jit(jnp.matmul)
    for m, k, n in shapes:
        x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        runners[f"xla {m}x{k}x{n}"] = lambda a=jnp.asarray(x), b=jnp.asarray(w): product(a, b).block_until_ready()
        runners[f"torch {m}x{k}x{n}"] = lambda a=torch.from_numpy(x), b=torch.from_numpy(w): torch.matmul(a, b)
    median = {name: statistics.median(t) for name, t in time_in_rounds(runners, max(rounds, 20), warmup=3).items()}
    ratios = [median[f"xla {m}x{k}x{n}"] / median[f"torch {m}x{k}x{n}"] for m, k, n in shapes]
    return {"shapes": shapes, "median_seconds": median, "torch_speedup": float(np.exp(np.mean(np.log(ratios))))}


class _PeftVariant:
    """PEFT's VeRA on the PyTorch twin of the model: Adam on the vectors (and the head)."""

    def __init__(self, source: str, args, batch):
        import peft
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        if args.task == "causal-lm":  # the loss on every next token, as the JAX variants compute it
            model, task_type = AutoModelForCausalLM.from_pretrained(source), "CAUSAL_LM"
            batch = {**batch, "labels": batch["input_ids"]}
        else:
            model, task_type = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2), "SEQ_CLS"
        config = peft.VeraConfig(r=args.r, target_modules=list(args.targets), task_type=task_type)
        self.model = peft.get_peft_model(model, config)
        self.model.train(not args.no_dropout)  # eval mode turns dropout off; gradients flow either way
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=1e-3)
        self.inputs = {k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in batch.items()}
        self.peak_bytes = None  # PyTorch keeps no allocator statistics on the CPU

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model(**self.inputs).loss.backward()
        self.optimizer.step()


def bench(args: argparse.Namespace) -> dict:
    causal = args.task == "causal-lm"
    if causal:
        model = load_causal_lm(args.model, args.base_dtype, max_positions=args.seq_len)[0]
    else:
        model = load_classifier(args.model, 2)[0]
    params = model.params
    config = vera_jax.VeraConfig(r=args.r, target_modules=tuple(args.targets),
                                 modules_to_save=() if causal else ("classifier",))
    adapter = vera_jax.init_adapter(params, config)
    tokens = args.batch_size * args.seq_len

    def base(p, ids):  # the model in eval mode on unpadded rows
        return model.logits(p, {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}, None)

    plan = vera_jax.whole_step_plan(base, params, adapter, np.ones((args.batch_size, args.seq_len), np.int32),
                                    tokens=tokens)
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    low = min(1000, vocab // 2)  # past the special tokens of a real vocabulary
    batch = {"input_ids": rng.integers(low, vocab, (args.batch_size, args.seq_len), np.int32),
             "attention_mask": np.ones((args.batch_size, args.seq_len), np.int32),
             "labels": (np.ones((args.batch_size, args.seq_len), np.float32) if causal
                        else rng.integers(0, 2, args.batch_size).astype(np.int32))}
    device_batch = jax.device_put(batch)

    dropout = not args.no_dropout
    variants = {}
    for name in VERA_VARIANTS:
        variants[name] = training_step(model.vera_logits(plan if name == "auto" else name, config), adapter, params,
                                       device_batch, args.task, dropout=dropout)
    scale = FloorScale(jnp.zeros((model.config.hidden_size,), jnp.float32))
    variants["floor"] = training_step(_floor_logits(model, _embeddings_module(params)), scale, params, device_batch,
                                      args.task, dropout=dropout)
    if not args.no_peft:
        try:
            source = model_source(args.model)
            if lacks_torch_weights(source):
                print(f"PEFT skipped: {source} has no PyTorch weights")
            else:
                variants["peft"] = _PeftVariant(source, args, batch)
        except ImportError as err:
            print(f"PEFT skipped: {err}")

    times = time_in_rounds(variants, args.steps, args.warmup, args.settle)
    median = {name: statistics.median(t) for name, t in times.items()}
    best = min(median["merged"], median["activation"])
    results = {
        "workload": {"name": args.workload, "model": args.model, "task": args.task, "base_dtype": args.base_dtype,
                     "model_dropout": dropout,
                     "batch_size": args.batch_size, "seq_len": args.seq_len, "r": args.r,
                     "targets": list(args.targets), "tokens_per_step": tokens, "steps": args.steps},
        "spread_seconds": {name: [min(t), max(t)] for name, t in times.items()},
        "device": f"{jax.devices()[0].device_kind} ({jax.device_count()} device, {platform.processor() or 'cpu'})",
        "auto_plan": plan.summary(),
        "median_seconds": median,
        "peak_bytes": {name: variant.peak_bytes for name, variant in variants.items()},
        "floor_ratio": median["auto"] / median["floor"],
        "auto_vs_best": median["auto"] / best,
        "lean_vs_activation_memory": (variants["activation-lean"].peak_bytes / variants["activation"].peak_bytes
                                      if variants["activation"].peak_bytes else None),
    }
    if "peft" in median:
        results["peft_speedup"] = median["peft"] / median["auto"]
        results["dense_products"] = dense_products(tokens, model.config.hidden_size, model.config.intermediate_size,
                                                   args.steps)
    _print(results)
    if causal and not args.no_nnx:
        if model.config.model_type != "llama":
            print(f"NNX table skipped: the NNX backend runs Llama models, not {model.config.model_type!r}")
        else:
            results["nnx"] = nnx_bench.compile_table(args, device_batch)
            nnx_bench.print_table(results["nnx"], model.config.num_hidden_layers)
    if args.json:
        write_json(args.json, results)
    return results


def _print(results: dict) -> None:
    median, peak, floor = results["median_seconds"], results["peak_bytes"], results["median_seconds"]["floor"]
    print(f"{results['workload']} on {results['device']}")
    print(results["auto_plan"])
    print(f"{'variant':<16}{'median step':>14}{'x floor':>9}{'peak memory':>14}")
    for name, seconds in median.items():
        memory = f"{peak[name] / 2**20:.0f} MiB" if peak[name] else "n/a"
        print(f"{name:<16}{seconds * 1e3:>11.1f} ms{seconds / floor:>9.2f}{memory:>14}")
    if "dense_products" in results:
        dense = results["dense_products"]
        print("dense products alone: " + ", ".join(f"{name} {seconds * 1e3:.2f} ms"
                                                   for name, seconds in dense["median_seconds"].items())
              + f" (PyTorch {dense['torch_speedup']:.2f}x faster)")
    summary = {k: round(v, 3) for k, v in results.items() if k.endswith(("ratio", "speedup", "best", "memory")) and v}
    print(json.dumps(summary))
