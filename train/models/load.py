"""Load a Hugging Face checkpoint as a model, with its tokenizer: a packaged default, a hub id or a directory.

Sequence classifiers (`load_classifier`) and causal LMs (`load_causal_lm`), each on a backend: our NNX models
(BERT and RoBERTa encoders, Llama) read PyTorch-named safetensors themselves; transformers' Flax (linen) classes
(transformers<5, the ``hf-flax`` extra) convert PyTorch/safetensors checkpoints (``from_pt``). torch is never needed.
"""

from __future__ import annotations

import functools
from pathlib import Path

from train import assets, hub
from train.models.gguf_llama import convert
from train.models.hf_flax import HfFlaxModel, config_kernel_axes
from train.options import Options, flag_name

__all__ = ["load_classifier", "load_causal_lm", "ModelError", "flax_classes", "PACKAGED_MODELS", "hub_id",
           "lacks_torch_weights", "model_source", "check_source", "check_positions", "classifier_shapes"]


# Packaged model names -> (local directory builder, the hub id the same weights have online).
PACKAGED_MODELS = {
    "default": (assets.minilm_dir, "sentence-transformers/all-MiniLM-L6-v2"),
    "minilm": (assets.minilm_dir, "sentence-transformers/all-MiniLM-L6-v2"),
    "smollm2": (functools.partial(assets.smollm2_dir, convert), "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


class ModelError(ValueError):
    """The model cannot be loaded as the Flax class the job needs; the message says what to use instead."""


WEIGHT_FILES = ("flax_model*.msgpack*", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin*")


def check_source(name: str) -> None:
    """A ModelError, before anything loads, unless ``name`` is a packaged model, a folder with a config and
    weights, or a hub model that can be fetched (or is cached, when the hub cannot be reached)."""
    if name in PACKAGED_MODELS:
        return
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"--model {name} is a folder without a config.json, not a Hugging Face model folder; "
                             "give the folder that holds the model's config.json and weights.")
        if not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES):
            raise ModelError(f"--model {name} has a config.json but no weights (flax_model.msgpack, "
                             "model.safetensors or pytorch_model.bin); put the model's weights beside it.")
        return
    if path.exists():
        raise ModelError(f"--model {name} is a file; give a model folder, a hub id or a packaged name.")
    if not hub.reachable() and not hub.cached_model(name):
        raise ModelError(f"--model {name} is neither a local folder nor a hub model in the local cache, and the hub "
                         "cannot be reached (offline); give a model folder, or fetch the model while online.")


def check_positions(options: Options, fields: tuple[str, ...] = ("max_length",)) -> None:
    """A ModelError when the tokens of ``fields`` add up to more than the positions in the model's config, read
    before its weights (a config that cannot be read is left for the model's loader to report)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_source(options.model.name))
    except (OSError, ValueError):
        return
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and sum(options.get(f) for f in fields) > positions:
        flags = " plus ".join(f"{flag_name(f)} {options.get(f)}" for f in fields)
        raise ModelError(f"{flags} exceeds the {positions} positions of {options.model.name!r} "
                         f"(max_position_embeddings in its config); lower {'it' if len(fields) == 1 else 'them'}.")


def _has_flax_weights(path: Path) -> bool:
    return (path / "flax_model.msgpack").exists() or (path / "flax_model.msgpack.index.json").exists()


def lacks_torch_weights(source: str) -> bool:
    """Whether ``source`` is a local directory without PyTorch weights (PEFT in PyTorch cannot run it)."""
    path = Path(source)
    return path.is_dir() and not any((path / f).exists() for f in ("model.safetensors", "pytorch_model.bin"))


def hub_id(name: str) -> str:
    """The name a PEFT adapter records as its base model: the hub id of a packaged model, else ``name``."""
    return PACKAGED_MODELS[name][1] if name in PACKAGED_MODELS else name


def model_source(name: str) -> str:
    """The directory of a packaged model (fetched on first use), else ``name`` itself."""
    return str(PACKAGED_MODELS[name][0]()) if name in PACKAGED_MODELS else name


def flax_classes():
    """transformers' Flax (linen) module: the classes ``--backend linen`` runs; a ModelError in one line when the
    installed transformers has none (version 5 removed them)."""
    try:
        import transformers.models.auto.modeling_flax_auto as flax_auto
    except ImportError:
        import transformers

        raise ModelError(f"--backend linen runs transformers' Flax classes, which transformers "
                         f"{transformers.__version__} does not have (version 5 removed them); install the legacy "
                         "extra, pip install 'vera_jax[hf-flax]' (transformers<5), or use --backend nnx.") from None
    return flax_auto


def classifier_shapes(name: str, num_labels: int, backend: str = "linen") -> tuple[dict, tuple[tuple[str, str], ...]]:
    """The parameter shapes (``jax.ShapeDtypeStruct`` leaves) and kernel axes of ``name``'s sequence classifier on
    ``backend``, traced from its config without loading or drawing any weight; a ModelError when there is no such
    class."""
    if backend != "linen":
        from train.models.nnx_classifier import parameter_shapes

        return parameter_shapes(_encoder_config(name, num_labels, backend), scan_layers=backend == "nnx")
    config = _classifier_config(name, num_labels)
    model = flax_classes().FlaxAutoModelForSequenceClassification.from_config(config, _do_init=False)
    return model.params_shape_tree, config_kernel_axes(config)


def _read_config(name: str, **kwargs):
    """``name``'s transformers config; a ModelError when it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_source(name), **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(f"Cannot read a model config from {name!r}: {err}") from None


def _encoder_config(name: str, num_labels: int, backend: str):
    """The NNX encoder's config for ``name`` with ``num_labels`` outputs; a ModelError for other model types."""
    from train.models.nnx_encoder import EncoderConfig

    try:
        return EncoderConfig.from_hf(_read_config(name), num_labels)
    except ValueError as err:
        raise ModelError(f"{name!r}: {err} (--backend {backend})") from None


def _classifier_config(name: str, num_labels: int):
    """``name``'s config with ``num_labels`` outputs; a ModelError when it cannot be read or names a model type
    without a Flax sequence-classification class."""
    mapping = flax_classes().FLAX_MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    config = _read_config(name, num_labels=num_labels)
    if config.model_type not in mapping:
        raise ModelError(f"{name!r} is a {config.model_type!r} model, which has no Flax sequence-classification class "
                         f"in transformers; use one of {sorted(mapping)}.")
    return config


def _load_flax(auto_class, source: str, **kwargs):
    """``auto_class.from_pretrained``: Flax weights when the checkpoint has them, else converted from PyTorch."""
    local = Path(source)
    from_pt = local.is_dir() and not _has_flax_weights(local)
    try:
        return auto_class.from_pretrained(source, from_pt=from_pt, **kwargs)
    except OSError:
        if from_pt or local.is_dir():
            raise
        return auto_class.from_pretrained(source, from_pt=True, **kwargs)  # a hub repository with PyTorch weights only


def _from_safetensors(auto_class, directory: Path, config, seed: int):
    """``auto_class`` with the PyTorch-named ``model.safetensors`` in ``directory``, converted without the eager
    random initialisation ``from_pretrained`` runs first (seconds on a CPU): leaves the file lacks or holds in
    another shape (a new head) are those of ``init_weights(PRNGKey(seed), input_shape)``, drawn in one jitted
    program that returns only them (which JAX's compilation cache keeps)."""
    import types

    import jax
    from flax.traverse_util import flatten_dict, unflatten_dict
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    model = auto_class.from_config(config, _do_init=False, seed=seed)
    shapes = flatten_dict(model.params_shape_tree)
    with safe_open(str(directory / "model.safetensors"), framework="flax") as file:
        torch_state = {key: file.get_tensor(key) for key in file.keys()}
    stored = AutoConfig.from_pretrained(directory)  # the file's own head, which the conversion checks shapes against
    as_stored = model if stored.num_labels == config.num_labels else auto_class.from_config(stored, _do_init=False)
    shaped = types.SimpleNamespace(base_model_prefix=model.base_model_prefix, params=as_stored.params_shape_tree)
    loaded = flatten_dict(convert_pytorch_state_dict_to_flax(torch_state, shaped))
    params = {key: loaded[key] for key in shapes if key in loaded and loaded[key].shape == shapes[key].shape}
    missing = [key for key in shapes if key not in params]
    if missing:  # only the missing leaves leave the program: XLA drops the rest of the draw
        draw = jax.jit(lambda key: [flatten_dict(model.init_weights(key, model.input_shape))[k] for k in missing])
        params |= dict(zip(missing, draw(jax.random.PRNGKey(seed))))
    model._is_initialized = True  # transformers' flag for a model that holds its params (set below)
    model.params = unflatten_dict(params)
    return model


def load_causal_lm(name: str, dtype: str = "float32", max_positions: int | None = None, backend: str = "linen",
                   scan_remat: str | None = None):
    """``(model, tokenizer)`` of a causal LM (a `train.models.interface.CausalLM`); ``dtype='bfloat16'`` stores and
    runs the base in bfloat16.

    ``backend``: ``"nnx"`` (a Llama-architecture checkpoint as `train.models.nnx_causal_lm.NnxCausalLM`, layers
    stacked and scanned, keeping for the backward pass what ``scan_remat`` says: a key of
    `train.models.scan.SCAN_REMAT`, None for its default),
    ``"nnx-listed"`` (the same, layers in a list) or ``"linen"`` (transformers' Flax class).

    ``max_positions``: the longest sequence the job runs. A rotary Llama or Mistral whose config allows
    more is loaded with that many positions: Flax builds a (positions, positions) causal mask in every
    attention layer (32768 positions: 1 GiB a layer), and rotary models have no position weights to cut.

    A Llama or Mistral whose ``rope_theta`` is not 10000 loads as a class of `train.models.llama_rope` (stock
    Flax Llama and Mistral hard-code the rotary base); a Mistral without a sliding window gets one as
    long as its positions (stock Flax Mistral would let each token attend to itself only).
    """
    import jax.numpy as jnp
    from transformers import AutoTokenizer

    if dtype not in ("float32", "bfloat16"):
        raise ModelError(f"--base-dtype must be 'float32' or 'bfloat16', got {dtype!r}.")
    source = model_source(name)
    config = _read_config(name)
    if backend != "linen":
        return _load_nnx(name, source, config, dtype, backend, scan_remat), AutoTokenizer.from_pretrained(source)
    flax_auto = flax_classes()
    from train.models.llama_rope import ROPE_THETA_CLASSES, needs_rope_theta

    mapping = flax_auto.FLAX_MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if config.model_type not in mapping:
        raise ModelError(f"{name!r} is a {config.model_type!r} model, which has no Flax causal-LM class in "
                         f"transformers; use one of {sorted(mapping)}.")
    if max_positions is not None and config.model_type in ROPE_THETA_CLASSES:
        config.max_position_embeddings = min(config.max_position_embeddings, max_positions)
    if config.model_type == "mistral" and config.sliding_window is None:
        # Flax Mistral builds its mask as triu(causal, -(sliding_window or 0)): no window would mean each
        # token sees itself only. A window as long as the positions is no window at all.
        config.sliding_window = config.max_position_embeddings
    auto_class = ROPE_THETA_CLASSES[config.model_type] if needs_rope_theta(config) else \
        flax_auto.FlaxAutoModelForCausalLM
    model = _load_flax(auto_class, source, config=config, dtype=getattr(jnp, dtype))
    if dtype == "bfloat16":
        model.params = model.to_bf16(model.params)
    return HfFlaxModel(model, hub_id(name)), AutoTokenizer.from_pretrained(source)


def _load_nnx(name: str, source: str, config, dtype: str, backend: str, scan_remat: str | None):
    """The NNX Llama of a local directory, or of a hub repository's safetensors (fetched once)."""
    from train.models.nnx_causal_lm import load_nnx_causal_lm

    if config.model_type != "llama":
        raise ModelError(f"{name!r} is a {config.model_type!r} model; --backend {backend} runs Llama-architecture "
                         "models (SmolLM2, Llama): use --backend linen for it.")
    try:
        return load_nnx_causal_lm(_safetensors_directory(source), config, hub_id(name), dtype=dtype,
                                  scan_layers=backend == "nnx", scan_remat=scan_remat)
    except ValueError as err:
        raise ModelError(f"{name!r}: {err}") from None


def load_classifier(name: str, num_labels: int, seed: int = 0, backend: str = "linen", scan_remat: str | None = None):
    """``(model, tokenizer)`` of a sequence classifier (a `train.models.interface.Model`).

    ``backend``: ``"nnx"`` (a BERT or RoBERTa checkpoint's PyTorch-named safetensors as
    `train.models.nnx_classifier.NnxClassifier`, layers stacked and scanned, keeping for the backward pass what
    ``scan_remat`` says: a key of `train.models.scan.SCAN_REMAT`, None for its default), ``"nnx-listed"`` (the
    same, layers in
    a list) or ``"linen"`` (transformers' Flax class, an `HfFlaxModel`; PyTorch/safetensors checkpoints are
    converted).

    Leaves the checkpoint lacks (a new head, or one of another size) are drawn from ``seed``: the NNX encoder's
    initialisation, or transformers' ``model.init_weights(jax.random.PRNGKey(seed), model.input_shape)``.
    """
    from transformers import AutoTokenizer

    source = model_source(name)
    if backend != "linen":
        return (_load_nnx_classifier(name, source, num_labels, seed, backend, scan_remat),
                AutoTokenizer.from_pretrained(source))
    auto_class = flax_classes().FlaxAutoModelForSequenceClassification
    config = _classifier_config(name, num_labels)
    # A head of another size (other labels, or regression) is re-initialised: it is trained in full anyway.
    local = Path(source)
    if local.is_dir() and not _has_flax_weights(local) and (local / "model.safetensors").is_file():
        model = _from_safetensors(auto_class, local, config, seed)
    else:
        model = _load_flax(auto_class, source, config=config, ignore_mismatched_sizes=True, seed=seed)
    return HfFlaxModel(model, hub_id(name)), AutoTokenizer.from_pretrained(source)


def _load_nnx_classifier(name: str, source: str, num_labels: int, seed: int, backend: str, scan_remat: str | None):
    """The NNX encoder of a local directory, or of a hub repository's safetensors (fetched once)."""
    from train.models.nnx_classifier import load_nnx_classifier

    config = _read_config(name, num_labels=num_labels)
    try:
        return load_nnx_classifier(_safetensors_directory(source), config, hub_id(name), num_labels=num_labels,
                                   seed=seed, scan_layers=backend == "nnx", scan_remat=scan_remat)
    except ValueError as err:
        raise ModelError(f"{name!r}: {err}") from None


def _safetensors_directory(source: str) -> Path:
    """``source`` itself when it is a directory, else the hub repository's config, safetensors and tokenizer."""
    directory = Path(source)
    if directory.is_dir():
        return directory
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.txt"]))
