"""BERT and RoBERTa encoders with a sequence-classification head in Flax NNX, layers in a list or stacked
and run with ``nnx.scan``, loaded straight from PyTorch-named safetensors (no transformers Flax class, no
PyTorch).

Module paths mirror Hugging Face's PyTorch names (``bert/encoder/layer/0/attention/self/query`` is
``bert.encoder.layer.0.attention.self.query``; stacked: ``bert/encoder/layer/attention/self/query``
with the layer axis first); projections are ``nnx.Linear`` (kernel (in, out) = PyTorch's weight
transposed). The maths is transformers' ``BertForSequenceClassification`` (pooler, then the classifier)
and ``RobertaForSequenceClassification`` (the classification head on the first token; positions
counted from ``pad_token_id + 1`` over the unpadded tokens), post-LayerNorm layers with erf GELU, and
the model's dropout when called with ``train=True``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from train.models.scan import DEFAULT_SCAN_REMAT, DROPOUT_MASK, check_scan_remat, run_stacked
from train.models.torch_weights import read_safetensors
from vera_jax import paths

__all__ = ["EncoderConfig", "EncoderForSequenceClassification", "torch_leaves", "to_torch", "from_torch", "drawn",
           "load"]

KINDS = ("bert", "roberta")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """The fields of a Hugging Face BERT or RoBERTa ``config.json`` this model reads."""

    kind: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0
    num_labels: int = 2
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, config: Mapping | object, num_labels: int | None = None) -> EncoderConfig:
        """From a ``config.json`` dict or a transformers config object.

        Raises:
          ValueError: a model type other than BERT or RoBERTa, or an activation other than GELU.
        """
        get = config.get if isinstance(config, Mapping) else lambda name, default=None: getattr(config, name, default)
        kind, activation = get("model_type"), get("hidden_act", "gelu")
        if kind not in KINDS or activation != "gelu":
            raise ValueError(f"The NNX encoder builds {KINDS} models with GELU; this config is a {kind!r} with "
                             f"{activation!r}. Use --backend linen for other encoders.")
        fields = {field.name: get(field.name) for field in dataclasses.fields(cls) if field.name != "kind"}
        if num_labels is not None:
            fields["num_labels"] = num_labels
        elif get("id2label"):
            fields["num_labels"] = len(get("id2label"))
        return cls(kind=kind, **{name: value for name, value in fields.items() if value is not None})


class Dropout(nnx.Dropout):
    """``nnx.Dropout`` (the same draws) with its mask named `train.models.scan.DROPOUT_MASK`, which the scanned
    stack's default policy keeps for the backward pass instead of drawing it again."""

    def __call__(self, inputs: jax.Array, *, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return inputs
        if self.rate == 1.0:  # no division by a keep probability of 0 (NaN gradients)
            return jnp.zeros_like(inputs)
        keep = 1.0 - self.rate
        mask = checkpoint_name(jax.random.bernoulli(self.rngs(), p=keep, shape=inputs.shape), DROPOUT_MASK)
        return jax.lax.select(mask, inputs / keep, jnp.zeros_like(inputs))


class LayerNorm(nnx.Module):
    """PyTorch's LayerNorm names: ``weight`` and ``bias``."""

    def __init__(self, size: int, eps: float):
        self.weight, self.bias, self.eps = nnx.Param(jnp.ones((size,))), nnx.Param(jnp.zeros((size,))), eps

    def __call__(self, x: jax.Array) -> jax.Array:
        mean = jnp.mean(x, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(variance + self.eps) * self.weight[...] + self.bias[...]


class Embeddings(nnx.Module):
    def __init__(self, config: EncoderConfig, rngs: nnx.Rngs):
        embed = lambda n: nnx.Embed(n, config.hidden_size, rngs=rngs)  # noqa: E731
        self.word_embeddings = embed(config.vocab_size)
        self.position_embeddings = embed(config.max_position_embeddings)
        self.token_type_embeddings = embed(config.type_vocab_size)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob, rngs=rngs)

    def __call__(self, input_ids, positions, token_type_ids, train: bool) -> jax.Array:
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x), deterministic=not train)


class SelfAttention(nnx.Module):
    def __init__(self, config: EncoderConfig, rngs: nnx.Rngs):
        linear = lambda: nnx.Linear(config.hidden_size, config.hidden_size, rngs=rngs)  # noqa: E731
        self.query, self.key, self.value = linear(), linear(), linear()
        self.dropout = Dropout(config.attention_probs_dropout_prob, rngs=rngs)
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim

    def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
        batch, seq, _ = x.shape
        heads = lambda y: y.reshape(batch, seq, self.heads, self.head_dim)  # noqa: E731
        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(self.head_dim))
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        weights = self.dropout(jax.nn.softmax(scores, axis=-1), deterministic=not train)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, seq, -1)


class DenseOutput(nnx.Module):
    """``dense``, dropout, then ``LayerNorm`` of the residual sum (BERT's ``SelfOutput`` and ``Output``)."""

    def __init__(self, config: EncoderConfig, in_features: int, rngs: nnx.Rngs):
        self.dense = nnx.Linear(in_features, config.hidden_size, rngs=rngs)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob, rngs=rngs)

    def __call__(self, h: jax.Array, residual: jax.Array, train: bool) -> jax.Array:
        return self.LayerNorm(self.dropout(self.dense(h), deterministic=not train) + residual)


class Attention(nnx.Module):
    def __init__(self, config: EncoderConfig, rngs: nnx.Rngs):
        self.self = SelfAttention(config, rngs)
        self.output = DenseOutput(config, config.hidden_size, rngs)

    def __call__(self, x, mask, train):
        return self.output(self.self(x, mask, train), x, train)


class Intermediate(nnx.Module):
    def __init__(self, config: EncoderConfig, rngs: nnx.Rngs):
        self.dense = nnx.Linear(config.hidden_size, config.intermediate_size, rngs=rngs)

    def __call__(self, x):
        return jax.nn.gelu(self.dense(x), approximate=False)


class Layer(nnx.Module):
    def __init__(self, config: EncoderConfig, rngs: nnx.Rngs):
        self.attention = Attention(config, rngs)
        self.intermediate = Intermediate(config, rngs)
        self.output = DenseOutput(config, config.intermediate_size, rngs)

    def __call__(self, x, mask, train):
        x = self.attention(x, mask, train)
        return self.output(self.intermediate(x), x, train)


class Encoder(nnx.Module):
    def __init__(self, config: EncoderConfig, scan_layers: bool, scan_remat: str, rngs: nnx.Rngs):
        check_scan_remat(scan_remat)
        if scan_layers:
            @nnx.split_rngs(splits=config.num_hidden_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked(rngs):
                return Layer(config, rngs)

            self.layer = stacked(rngs)
        else:
            self.layer = nnx.List([Layer(config, rngs) for _ in range(config.num_hidden_layers)])
        self.scan_layers, self.scan_remat = scan_layers, scan_remat

    def __call__(self, x, mask, train):
        if self.scan_layers:  # each stacked layer's dropout draws from its own stream
            return run_stacked(self.layer, x, lambda layer, x: layer(x, mask, train), self.scan_remat)
        for layer in self.layer:
            x = layer(x, mask, train)
        return x


class Backbone(nnx.Module):
    """Embeddings, encoder and (BERT) pooler."""

    def __init__(self, config: EncoderConfig, scan_layers: bool, scan_remat: str, rngs: nnx.Rngs):
        self.embeddings = Embeddings(config, rngs)
        self.encoder = Encoder(config, scan_layers, scan_remat, rngs)
        if config.kind == "bert":
            self.pooler = Pooler(config, rngs)
        self.config = config

    def __call__(self, input_ids, attention_mask, token_type_ids, train):
        config = self.config
        if config.kind == "roberta":  # positions count the real tokens from pad_token_id + 1
            real = (input_ids != config.pad_token_id).astype(jnp.int32)
            positions = jnp.cumsum(real, axis=-1) * real + config.pad_token_id
        else:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        x = self.embeddings(input_ids, positions, token_type_ids, train)
        return self.encoder(x, attention_mask[:, None, None, :].astype(bool), train)


class Pooler(nnx.Module):
    def __init__(self, config: EncoderConfig, rngs: nnx.Rngs):
        self.dense = nnx.Linear(config.hidden_size, config.hidden_size, rngs=rngs)

    def __call__(self, hidden):
        return jnp.tanh(self.dense(hidden[:, 0]))


class RobertaHead(nnx.Module):
    def __init__(self, config: EncoderConfig, rngs: nnx.Rngs):
        self.dense = nnx.Linear(config.hidden_size, config.hidden_size, rngs=rngs)
        self.out_proj = nnx.Linear(config.hidden_size, config.num_labels, rngs=rngs)
        self.dropout = Dropout(config.hidden_dropout_prob, rngs=rngs)

    def __call__(self, hidden, train):
        x = self.dropout(hidden[:, 0], deterministic=not train)
        return self.out_proj(self.dropout(jnp.tanh(self.dense(x)), deterministic=not train))


class EncoderForSequenceClassification(nnx.Module):
    """``model(input_ids, attention_mask, token_type_ids=None, train=False) -> logits (batch, num_labels)``.

    The backbone sits at ``bert`` or ``roberta`` (the config's kind), the head at ``classifier``.
    ``scan_layers``: stack the layers and run them with ``nnx.scan`` (else a list); ``scan_remat``: what the
    scanned stack keeps for the backward pass (a key of `train.models.scan.SCAN_REMAT`; the outputs are the same).
    """

    def __init__(self, config: EncoderConfig, *, scan_layers: bool = False, scan_remat: str = DEFAULT_SCAN_REMAT,
                 rngs: nnx.Rngs):
        setattr(self, config.kind, Backbone(config, scan_layers, scan_remat, rngs))
        if config.kind == "bert":
            self.dropout = Dropout(config.hidden_dropout_prob, rngs=rngs)
            self.classifier = nnx.Linear(config.hidden_size, config.num_labels, rngs=rngs,
                                         kernel_init=nnx.initializers.normal(config.initializer_range),
                                         bias_init=nnx.initializers.zeros)
        else:
            self.classifier = RobertaHead(config, rngs)
        self.config = config

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, train: bool = False) -> jax.Array:
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        backbone = getattr(self, self.config.kind)
        hidden = backbone(input_ids, attention_mask, token_type_ids, train)
        if self.config.kind == "roberta":
            return self.classifier(hidden, train)
        return self.classifier(self.dropout(backbone.pooler(hidden), deterministic=not train))


def _nnx_leaf(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """A PyTorch state-dict entry -> (NNX path, value): Linear weights transposed into (in, out) kernels."""
    module, _, leaf = name.rpartition(".")
    path = module.replace(".", "/")
    if module.endswith("embeddings") and leaf == "weight":
        return f"{path}/embedding", value
    if module.endswith("LayerNorm"):
        return f"{path}/{leaf}", value
    return (f"{path}/kernel", value.T) if leaf == "weight" else (f"{path}/{leaf}", value)


def _stack_layers(flat: dict[str, np.ndarray], root: str) -> dict[str, np.ndarray]:
    """``root/0/...`` ... ``root/{L-1}/...`` -> ``root/...`` with the layer axis first."""
    rows: dict[str, dict[int, np.ndarray]] = {}
    out = {}
    for path, value in flat.items():
        if path.startswith(root + "/"):
            index, _, rest = path[len(root) + 1:].partition("/")
            rows.setdefault(f"{root}/{rest}", {})[int(index)] = value
        else:
            out[path] = value
    return out | {path: np.stack([by_layer[i] for i in sorted(by_layer)]) for path, by_layer in rows.items()}


def torch_leaves(state_dict: Mapping[str, np.ndarray], config: EncoderConfig, *,
                 scan_layers: bool = False) -> dict[str, np.ndarray]:
    """A PyTorch BERT or RoBERTa's weights (numpy arrays by their PyTorch names, with or without the
    ``bert.``/``roberta.`` prefix of a classifier's checkpoint) by their paths in this model (stacked when
    ``scan_layers``); Linear weights transposed into (in, out) kernels."""
    prefix = config.kind + "."
    named = {(name if name.startswith((prefix, "classifier.")) else prefix + name): value
             for name, value in state_dict.items() if not name.endswith("position_ids")}
    flat = dict(_nnx_leaf(name, np.asarray(value)) for name, value in named.items())
    return _stack_layers(flat, f"{config.kind}/encoder/layer") if scan_layers else flat


def _torch_entry(path: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """(NNX path, value) -> the PyTorch state-dict entry: `_nnx_leaf` inverted."""
    module, _, leaf = path.rpartition("/")
    name = module.replace("/", ".")
    if leaf == "embedding":
        return f"{name}.weight", value
    return (f"{name}.weight", value.T) if leaf == "kernel" else (f"{name}.{leaf}", value)


def to_torch(leaves: Mapping[str, np.ndarray], config: EncoderConfig, *,
             scan_layers: bool = False) -> dict[str, np.ndarray]:
    """This model's params (numpy arrays by path, a scanned stack with the layer axis first) by the names of
    transformers' PyTorch ``BertForSequenceClassification``/``RobertaForSequenceClassification``: `torch_leaves`
    inverted, each array C-contiguous as safetensors writes it."""
    root = f"{config.kind}/encoder/layer/"
    flat = {}
    for path, value in leaves.items():
        value = np.asarray(value)
        if scan_layers and path.startswith(root):
            flat |= {f"{root}{index}/{path[len(root):]}": row for index, row in enumerate(value)}
        else:
            flat[path] = value
    return {name: np.ascontiguousarray(value)
            for name, value in (_torch_entry(path, value) for path, value in sorted(flat.items()))}


def from_torch(state_dict: Mapping[str, np.ndarray], config: EncoderConfig, *, scan_layers: bool = False,
               scan_remat: str = DEFAULT_SCAN_REMAT, seed: int = 0) -> EncoderForSequenceClassification:
    """The NNX model holding a PyTorch BERT or RoBERTa's weights (see `torch_leaves`). A head the weights lack
    (a base model's checkpoint) or hold in another size (other labels) is drawn from ``seed`` as transformers
    initialises it.

    Raises:
      ValueError: weights missing from, or foreign to, this model (the head excepted).
    """
    model = nnx.eval_shape(lambda: _seeded(config, scan_layers, seed, scan_remat))  # shapes only: values from state_dict, `drawn`
    flat = torch_leaves(state_dict, config, scan_layers=scan_layers)
    current = paths.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    flat = {path: value for path, value in flat.items()
            if not (path.startswith("classifier/") and path in current and value.shape != current[path].shape)}
    missing = sorted(path for path in set(current) - set(flat) if not path.startswith("classifier/"))
    unexpected = sorted(set(flat) - set(current))
    wrong = sorted(path for path in set(flat) & set(current) if flat[path].shape != current[path].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"The weights do not fit this {config.kind} model: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}, of other shapes {wrong[:4]}.")
    state = nnx.state(model)
    layout = nnx.to_pure_dict(state)
    values = drawn(config, scan_layers, seed, set(paths.flatten(layout)) - set(flat))  # the head, the RNG streams
    values |= {path: jnp.asarray(value) for path, value in flat.items()}
    nnx.replace_by_pure_dict(state, paths.unflatten(values, like=layout))
    nnx.update(model, state)
    return model


def _seeded(config: EncoderConfig, scan_layers: bool, seed: int,
            scan_remat: str = DEFAULT_SCAN_REMAT) -> EncoderForSequenceClassification:
    return EncoderForSequenceClassification(config, scan_layers=scan_layers, scan_remat=scan_remat,
                                            rngs=nnx.Rngs(seed, dropout=seed))


def drawn(config: EncoderConfig, scan_layers: bool, seed: int, leaves: set[str]) -> dict[str, jax.Array]:
    """The leaves at ``leaves`` (paths into the model's whole state: params, RNG streams) of the model built with
    ``nnx.Rngs(seed, dropout=seed)``, each as that build draws it; one compiled program, which computes only those
    (building the model eagerly compiles each initializer, seconds for MiniLM)."""

    @jax.jit
    def build():
        model = _seeded(config, scan_layers, seed)
        return {path: value for path, value in paths.flatten(nnx.to_pure_dict(nnx.state(model))).items()
                if path in leaves}

    return build()


def load(directory: str | Path, *, num_labels: int | None = None, scan_layers: bool = False,
         scan_remat: str = DEFAULT_SCAN_REMAT, seed: int = 0) -> EncoderForSequenceClassification:
    """The model in a Hugging Face directory: ``config.json`` and its ``*.safetensors`` (PyTorch names)."""
    directory = Path(directory)
    config = EncoderConfig.from_hf(json.loads((directory / "config.json").read_text()), num_labels)
    return from_torch(read_safetensors(directory), config, scan_layers=scan_layers, scan_remat=scan_remat, seed=seed)
