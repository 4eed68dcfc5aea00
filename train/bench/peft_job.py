"""The main job's recipe run with Hugging Face PEFT in PyTorch, its VeRA or its LoRA: the peers of
``python -m train bench --job``.

The same split, the same tokenised rows and the same batches in the same order (each padded to its longest
row exactly, as ``DataCollatorWithPadding`` pads them), the same AdamW with the same two learning-rate
schedules (the adapter's, the head's), the model's own dropout on while training; validated when ours is (after
every epoch, every ``--eval-every`` steps and after the last step, when there are validation rows), the last
adapter tested, or with ``--keep-best`` the best validated, as ours.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import numpy as np

from train.engine import data as data_lib
from train.engine.loop import validation_due
from train.engine.run import count_steps
from train.models.load import model_source
from train.options import Options

__all__ = ["run_peft_job", "lr_factor", "LoraRecipe"]

EXACT = 1  # PyTorch compiles nothing per shape: a batch pads to its longest row exactly, as transformers' collator does


def lr_factor(kind: str, step: int, total_steps: int, warmup_ratio: float) -> float:
    """The learning rate at ``step`` over its peak, as `train.engine.steps` schedules it with optax."""
    warmup = max(1, int(round(warmup_ratio * total_steps)))
    if step < warmup:
        return step / warmup
    decay_steps, done = max(1, total_steps - warmup), min(step - warmup, max(1, total_steps - warmup))
    if kind == "linear":
        return 1.0 - done / decay_steps
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * done / decay_steps))
    return 1.0


@dataclasses.dataclass(frozen=True)
class LoraRecipe:
    """PEFT's LoRA as the peer runs it on the modules VeRA adapts: rank 8, alpha = rank (scaling 1) and learning
    rate 5e-4, the LoRA paper's RoBERTa-base GLUE settings (Hu et al. 2021, appendix D); no LoRA dropout
    (PEFT's default, as VeRA's here); the head trains as VeRA's, at ``--lr-head``."""

    rank: int = 8
    lr: float = 5e-4


def run_peft_job(options: Options, lora: LoraRecipe | None = None) -> dict:
    """Train and evaluate as ``python -m train`` would with ``options``, in PyTorch with PEFT's VeRA (or, with
    ``lora``, PEFT's LoRA on the same modules).

    Returns ``{"test_accuracy", "wall_seconds", "train_seconds", "validation_seconds", "eval_seconds", "steps",
    "trainable_params", "validations", "adapter_step"}`` (``validations``: each one's step and accuracy;
    ``adapter_step``: the step of the adapter tested); the wall time runs from reading the data to the end of the
    test, as the main job's ``summary.json`` counts it.
    """
    import peft
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    started = time.perf_counter()
    splits = data_lib.load_splits(options.data, options.optim.batch_size)
    num_labels = data_lib.check_labels(splits, options.data)
    source = model_source(options.model.name)
    tokenizer = AutoTokenizer.from_pretrained(source)
    train, test = (data_lib.tokenize(split, tokenizer, options.data.max_length, np.int64)
                   for split in (splits.train, splits.test))
    validation = None if splits.validation is None else data_lib.tokenize(
        splits.validation, tokenizer, options.data.max_length, np.int64)
    pad_id = tokenizer.pad_token_id or 0
    steps_per_epoch, total_steps = count_steps(options.optim, len(train))
    torch.manual_seed(options.run.seed)
    base = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels)
    adapter, optim = options.model, options.optim
    if lora is None:
        config = peft.VeraConfig(r=adapter.r, target_modules=list(adapter.targets), d_initial=adapter.d_initial,
                                 vera_dropout=adapter.dropout, projection_prng_key=options.run.seed,
                                 modules_to_save=list(adapter.head), task_type="SEQ_CLS")
        pattern, lr = r"vera_lambda_[bd]", optim.lr_vectors
    else:
        config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.rank, target_modules=list(adapter.targets),
                                 modules_to_save=list(adapter.head), task_type="SEQ_CLS")
        pattern, lr = r"lora_[AB]", lora.lr
    model = peft.get_peft_model(base, config)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for n, p in trained if re.search(pattern, n)], "lr": lr},
                                   {"params": [p for n, p in trained if not re.search(pattern, n)],
                                    "lr": optim.lr_head}], weight_decay=optim.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(optim.schedule, step, total_steps, optim.warmup_ratio))

    def tensors(batch: dict) -> dict:
        return {k: torch.from_numpy(np.asarray(batch[k], np.int64)) for k in ("input_ids", "attention_mask", "labels")}

    def accuracy(rows) -> float:
        """The accuracy on ``rows``, dropout off; training mode restored after."""
        model.eval()
        correct = 0
        with torch.no_grad():
            for start in range(0, len(rows), options.run.eval_batch_size):
                indices = np.arange(start, min(start + options.run.eval_batch_size, len(rows)))
                batch = tensors(data_lib.collate(rows, indices, pad_id, options.data.max_length, EXACT))
                labels = batch.pop("labels")
                correct += int((model(**batch).logits.argmax(-1) == labels).sum())
        model.train()
        return correct / len(rows)

    validations, best, validating = [], None, 0.0
    model.train()
    train_started = time.perf_counter()
    for step in range(total_steps):
        indices = data_lib.batch_indices(len(train), options.run.seed, step, steps_per_epoch, options.optim.batch_size)
        loss = model(**tensors(data_lib.collate(train, indices, pad_id, options.data.max_length, EXACT))).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if validation is not None and validation_due(done, steps_per_epoch, total_steps, options.run.eval_every):
            validating -= time.perf_counter()
            validations.append({"step": done, "validation_accuracy": accuracy(validation)})
            if options.run.keep_best and (best is None or validations[-1]["validation_accuracy"] >
                                          best["validation_accuracy"]):
                best = {**validations[-1], "state": {n: p.detach().clone() for n, p in trained}}
            validating += time.perf_counter()
    last_loss = loss.item()
    if not math.isfinite(last_loss):
        raise RuntimeError(f"PEFT's training loss is {last_loss} after {total_steps} steps.")
    eval_started = time.perf_counter()
    if best is not None:
        with torch.no_grad():
            for name, parameter in trained:
                parameter.copy_(best["state"][name])
    test_accuracy = accuracy(test)
    ended = time.perf_counter()
    return {"test_accuracy": test_accuracy, "wall_seconds": ended - started, "steps": total_steps,
            "train_seconds": eval_started - train_started - validating, "validation_seconds": validating,
            "eval_seconds": ended - eval_started, "trainable_params": sum(p.numel() for _, p in trained),
            "validations": validations, "adapter_step": total_steps if best is None else best["step"]}
