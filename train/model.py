"""Load a Hugging Face Flax sequence classifier and its tokenizer: packaged default, hub id or directory."""

from __future__ import annotations

from pathlib import Path

from train import assets

__all__ = ["load_classifier", "ModelError"]


class ModelError(ValueError):
    """The model cannot be loaded as a Flax sequence classifier; the message says what to use instead."""


def _has_flax_weights(path: Path) -> bool:
    return (path / "flax_model.msgpack").exists() or (path / "flax_model.msgpack.index.json").exists()


def load_classifier(name: str, num_labels: int):
    """``(model, tokenizer)``; PyTorch/safetensors checkpoints are converted by transformers (``from_pt``)."""
    from transformers import AutoConfig, AutoTokenizer, FlaxAutoModelForSequenceClassification
    from transformers.models.auto.modeling_flax_auto import FLAX_MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    source = str(assets.minilm_dir()) if name == "default" else name
    try:
        config = AutoConfig.from_pretrained(source, num_labels=num_labels)
    except (OSError, ValueError) as err:
        raise ModelError(f"Cannot read a model config from {name!r}: {err}") from None
    if config.model_type not in FLAX_MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise ModelError(f"{name!r} is a {config.model_type!r} model, which has no Flax sequence-classification class "
                         f"in transformers; use one of {sorted(FLAX_MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)}.")
    local = Path(source)
    from_pt = local.is_dir() and not _has_flax_weights(local)
    # A head of another size (other labels, or regression) is re-initialised: it is trained in full anyway.
    load = lambda pt: FlaxAutoModelForSequenceClassification.from_pretrained(  # noqa: E731
        source, config=config, from_pt=pt, ignore_mismatched_sizes=True)
    try:
        model = load(from_pt)
    except OSError:
        if from_pt or local.is_dir():
            raise
        model = load(True)  # a hub repository with PyTorch weights only
    return model, AutoTokenizer.from_pretrained(source)
