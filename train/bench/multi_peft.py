"""PEFT in PyTorch as the peer of ``python -m train bench-multi``, used as PEFT users use it.

- Training K adapters (`PeftSweepTrainer`): one ``PeftModel`` holding K VeRA adapters, each step on its
  adapter's own batch after ``set_adapter``, an Adam optimizer per adapter.
- Serving a mixed batch (`PeftGroupedServer`): PEFT has no mixed-adapter forward for VeRA (its
  ``_mixed_batch_forward`` serves LoRA only), so a PEFT server groups the batch by adapter and runs one
  forward per group after ``set_adapter``, here holding the very adapters vera_jax serves (each written
  with `vera_jax.peft.save_adapter` and loaded by PEFT).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np

import vera_jax
from vera_jax import peft as vera_peft

__all__ = ["PeftGroupedServer", "PeftSweepTrainer"]


class PeftGroupedServer:
    """A PEFT ``PeftModel`` with the N adapters of ``stacked``, serving a batch grouped by adapter id."""

    def __init__(self, source: str, params, stacked: vera_jax.Adapter, batch: dict, ids: np.ndarray):
        """``source``: a model directory with PyTorch weights; ``batch``: numpy input_ids / attention_mask
        (B, T); ``ids`` (B,): the adapter of each row."""
        import peft
        import torch
        from transformers import AutoModelForSequenceClassification

        base = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2).eval()
        with tempfile.TemporaryDirectory(prefix="vera_jax_peft_peer_") as scratch:
            for index, adapter in enumerate(vera_jax.unstack(stacked)):
                directory = vera_peft.save_adapter(Path(scratch) / str(index), adapter, params, task_type="SEQ_CLS")
                if index == 0:
                    self.model = peft.PeftModel.from_pretrained(base, directory, adapter_name="0")
                else:
                    self.model.load_adapter(directory, adapter_name=str(index))
        self.model.eval()
        self.torch = torch
        self.inputs = {k: torch.from_numpy(np.asarray(batch[k], np.int64)) for k in ("input_ids", "attention_mask")}
        self.groups = [(int(a), torch.from_numpy(np.flatnonzero(ids == a))) for a in np.unique(ids)]

    def logits(self) -> np.ndarray:
        """(B, labels): each group of rows through its adapter, one forward per adapter in the batch."""
        out = None
        with self.torch.no_grad():
            for adapter, rows in self.groups:
                self.model.set_adapter(str(adapter))
                group = self.model(**{k: v[rows] for k, v in self.inputs.items()}).logits
                if out is None:
                    out = group.new_empty((len(self.inputs["input_ids"]), group.shape[-1]))
                out[rows] = group
        return out.numpy()

    def __call__(self) -> None:
        self.logits()


class PeftSweepTrainer:
    """K VeRA adapters in one ``PeftModel``; a call trains each for one step on its own batch, in turn."""

    def __init__(self, source: str, r: int, targets: list[str], batches: dict, learning_rate: float = 1e-3):
        """``batches``: numpy input_ids / attention_mask (K, B, T) and labels (K, B), one batch per adapter."""
        import peft
        import torch
        from transformers import AutoModelForSequenceClassification

        base = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
        config = peft.VeraConfig(r=r, target_modules=list(targets), task_type="SEQ_CLS")
        self.names = [str(index) for index in range(len(batches["input_ids"]))]
        self.model = peft.get_peft_model(base, config, adapter_name=self.names[0])
        for name in self.names[1:]:
            self.model.add_adapter(name, config)
        self.model.eval()  # the base in eval mode, as vera_jax's timed programs run it; gradients flow all the same
        self.optimizers = [torch.optim.Adam(self.parameters(name), lr=learning_rate) for name in self.names]
        self.batches = [{k: torch.from_numpy(np.asarray(v[index], np.int64)) for k, v in batches.items()}
                        for index in range(len(self.names))]

    def parameters(self, name: str) -> list:
        """The adapter's own trainable tensors: its vectors and its copy of the head."""
        own = re.compile(rf"(vera_lambda_[bd]|modules_to_save)\.{re.escape(name)}(\.|$)")
        return [p for n, p in self.model.named_parameters() if own.search(n)]

    def __call__(self) -> None:
        for name, optimizer, batch in zip(self.names, self.optimizers, self.batches):
            self.model.set_adapter(name)
            optimizer.zero_grad(set_to_none=True)
            self.model(**batch).loss.backward()
            optimizer.step()
