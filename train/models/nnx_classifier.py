"""A BERT or RoBERTa sequence classifier in Flax NNX (`train.models.nnx_encoder`), presented to the jobs as a
`train.models.interface.Model`: the adapted model is a pure function of (params, adapter) on either path
(`vera_jax.nnx.functional`), with the model's dropout drawn from the step's key and the head trained in full
through the adapter's ``modules_to_save``.

Weights come from a directory of PyTorch-named safetensors (the packaged MiniLM, or any BERT or RoBERTa
checkpoint); no transformers model class and no PyTorch are involved.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
from flax import nnx
from safetensors.numpy import save_file

import vera_jax
import vera_jax.nnx
from vera_jax import atomic
from vera_jax import export as merged_export
from train.models import nnx_encoder
from train.models import nnx_state
from train.models.nnx_state import holding
from train.models.scan import DEFAULT_SCAN_REMAT
from train.models.torch_weights import read_safetensors

__all__ = ["NnxClassifier", "load_nnx_classifier", "parameter_shapes", "stack_root"]


_ARCHITECTURES = {"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification"}


def stack_root(kind: str) -> str:
    """Where a scanned encoder's stacked layers live; PyTorch numbers them ``{kind}.encoder.layer.{i}``."""
    return f"{kind}/encoder/layer"


def _kernel_axes(kind: str, scan_layers: bool) -> tuple[tuple[str, str], ...]:
    """``nnx.Linear`` kernels are (in, out); a stack's have the layer axis first."""
    return ((f"{stack_root(kind)}/.*", "lio"),) if scan_layers else ()


def parameter_shapes(config: nnx_encoder.EncoderConfig, scan_layers: bool) -> tuple[dict, tuple]:
    """The params' shapes (``jax.ShapeDtypeStruct`` leaves) and kernel axes of the classifier ``config`` builds,
    traced without drawing any weight."""
    model = nnx.eval_shape(lambda: nnx_encoder.EncoderForSequenceClassification(
        config, scan_layers=scan_layers, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param)), _kernel_axes(config.kind, scan_layers)


class NnxClassifier:
    """An `nnx_encoder.EncoderForSequenceClassification` split into its graphdef, params (a plain nested dict) and
    the rest of its state (its dropout streams)."""

    def __init__(self, model: nnx_encoder.EncoderForSequenceClassification, config, base_model_name: str,
                 drawn: tuple[str, ...] = ()):
        """``config``: the transformers config of the checkpoint; ``base_model_name``: what a PEFT adapter records
        as its base; ``drawn``: the param paths the checkpoint lacked (a new head), drawn at load."""
        self.config = config
        self.base_model_name = base_model_name
        self.kind = model.config.kind
        self.encoder_config = model.config
        encoder = getattr(model, self.kind).encoder
        self.scan_layers = encoder.scan_layers
        self.scan_remat = encoder.scan_remat if self.scan_layers else None
        self.drawn = drawn
        self.graphdef, self._state = nnx.split(model)
        self.params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    @property
    def stacks(self) -> tuple[str, ...]:
        return (stack_root(self.kind),) if self.scan_layers else ()

    @property
    def kernel_axes(self) -> tuple[tuple[str, str], ...]:
        return _kernel_axes(self.kind, self.scan_layers)

    def module(self, params: dict) -> nnx_encoder.EncoderForSequenceClassification:
        """The NNX model holding ``params`` (its own variables; nothing is copied eagerly under jit)."""
        return holding(self.graphdef, self._state, params)

    def logits(self, params: dict, batch: dict, rng: jax.Array | None) -> jax.Array:
        model = self.module(params)
        if rng is not None:
            nnx.reseed(model, policy="match_shape", dropout=rng)
        return model(batch["input_ids"], batch["attention_mask"], train=rng is not None)

    def vera_logits(self, path: str, config: vera_jax.VeraConfig) -> Callable:
        """The model with VeRA attached on ``path``; the head (``config.modules_to_save``) comes from the adapter's
        trainable leaves. The key splits into the model's dropout and VeRA's (``config.dropout``), as the linen
        models' does; the merged path never draws VeRA's."""
        template = vera_jax.nnx.attach(self.module(self.params), dataclasses.replace(config, modules_to_save=()),
                                       path=path)
        call = vera_jax.nnx.functional(template)

        def logits(params, adapter, batch, rng):
            model_rng, vera_rng = (None, None) if rng is None else jax.random.split(rng)
            return call(params, adapter, batch["input_ids"], batch["attention_mask"], train=rng is not None,
                        stream_keys=None if rng is None else {"dropout": model_rng},
                        dropout_key=None if path == "merged" else vera_rng)

        return logits

    def mixed_logits(self, config: vera_jax.VeraConfig) -> Callable:
        """Through `vera_jax.nnx.mixed`, which serves VeRA's vectors only: each adapter's head would be dropped, so
        a ``config`` with ``modules_to_save`` is refused."""
        if config.modules_to_save:
            raise ValueError("Serving many adapters in one batch on an NNX classifier takes adapters without "
                             f"modules_to_save; these train {config.modules_to_save} in full.")
        return nnx_state.mixed_logits(self.module(self.params), config)

    def hoists_merge(self, path) -> bool:
        """On the merged path: `logits` runs the base on merged params, so a run merges once a step."""
        return isinstance(path, str) and path == "merged"

    def initial_params(self, seed: int) -> dict:
        """The params as loaded, with the leaves the checkpoint lacked drawn again from ``seed``."""
        if not self.drawn:
            return self.params
        drawn = nnx_encoder.drawn(self.encoder_config, self.scan_layers, seed, set(self.drawn))
        return vera_jax.paths.unflatten(vera_jax.paths.flatten(self.params) | drawn, like=self.params)

    def save_merged(self, directory, adapter, *, format: str, tokenizer, overwrite: bool) -> Path:
        """``format="hf"``: ``model.safetensors`` by transformers' PyTorch names and ``config.json``, with ``adapter``
        merged in (its head included), and ``tokenizer`` beside them; ``AutoModelForSequenceClassification
        .from_pretrained(directory)`` loads it (transformers 4 or 5, PyTorch), no vera_jax needed."""
        if format != "hf":
            raise ValueError(f"an NNX classifier's merged export is a transformers PyTorch model (--format hf), not "
                             f"{format!r} (a transformers Flax model: train and export with --backend linen).")
        merged = vera_jax.paths.flatten(vera_jax.merge(self.params, adapter))
        weights = nnx_encoder.to_torch(merged, self.encoder_config, scan_layers=self.scan_layers)
        config = copy.deepcopy(self.config)
        config.num_labels = self.encoder_config.num_labels
        config.architectures = [_ARCHITECTURES[self.kind]]
        with atomic.staged_directory(directory, merged_export.KIND, overwrite, format="hf") as staging:
            save_file(weights, staging / "model.safetensors", metadata={"format": "pt"})
            config.save_pretrained(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
        return atomic.target_path(directory)


def load_nnx_classifier(directory: Path, config, base_model_name: str, *, num_labels: int, seed: int = 0,
                        scan_layers: bool = False, scan_remat: str | None = None) -> NnxClassifier:
    """The BERT or RoBERTa checkpoint in ``directory`` (``*.safetensors``, PyTorch names; ``config`` its
    transformers config) with a head of ``num_labels`` outputs; a head the checkpoint lacks (or holds in another
    size) is drawn from ``seed``.

    Raises:
      ValueError: no safetensors weights there, a model type the NNX encoder does not build, or weights that
        do not fit the config.
    """
    encoder_config = nnx_encoder.EncoderConfig.from_hf(config, num_labels)  # other model types fail before the read
    state_dict = read_safetensors(directory)
    model = nnx_encoder.from_torch(state_dict, encoder_config, scan_layers=scan_layers, seed=seed,
                                   scan_remat=scan_remat or DEFAULT_SCAN_REMAT)
    stored = nnx_encoder.torch_leaves(state_dict, encoder_config, scan_layers=scan_layers)
    params = vera_jax.paths.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    drawn = tuple(sorted(path for path, value in params.items()
                         if path not in stored or stored[path].shape != value.shape))
    return NnxClassifier(model, config, base_model_name, drawn)
