"""PEFT adapter files in both directions, with and without saved projections, and merged export."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import jax
import numpy as np
import pytest
from conftest import max_rel_error, random_like

import vera_jax
from vera_jax import checkpoint
from vera_jax import peft as vera_peft
from vera_jax.export import save_merged
from vera_jax.lora import save_lora

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

R = 8
TOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Case:
    torch_cls: Callable
    flax_cls: Callable
    config: object
    targets: list[str]
    peft_kwargs: dict
    head: tuple[str, ...]
    kernel_axes: tuple
    task_type: str | None
    inputs: np.ndarray


IDS = np.random.default_rng(0).integers(3, 90, size=(2, 10))
PIXELS = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
SMALL = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=56)
CASES = {
    "bert": Case(transformers.BertForSequenceClassification, transformers.FlaxBertForSequenceClassification,
                 transformers.BertConfig(vocab_size=99, hidden_size=32, num_labels=3, **SMALL),
                 ["query", "value"], {}, ("classifier",), (), "SEQ_CLS", IDS),
    "roberta": Case(transformers.RobertaForSequenceClassification, transformers.FlaxRobertaForSequenceClassification,
                    transformers.RobertaConfig(vocab_size=99, hidden_size=32, max_position_embeddings=40, **SMALL),
                    ["query", "key", "value"], {}, ("classifier",), (), "SEQ_CLS", IDS),
    "gpt2": Case(transformers.GPT2LMHeadModel, transformers.FlaxGPT2LMHeadModel,
                 transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=32),
                 ["c_attn", "c_proj", "c_fc"], {"fan_in_fan_out": True}, (), ((".*", "oi"),), "CAUSAL_LM", IDS),
    "llama": Case(transformers.LlamaForCausalLM, transformers.FlaxLlamaForCausalLM,
                  transformers.LlamaConfig(vocab_size=99, hidden_size=32, num_key_value_heads=2,
                                           max_position_embeddings=32, tie_word_embeddings=False, **SMALL),
                  ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], {}, (),
                  (), "CAUSAL_LM", IDS),
    "vit": Case(transformers.ViTForImageClassification, transformers.FlaxViTForImageClassification,
                transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_labels=5, **SMALL),
                ["query", "value"], {"modules_to_save": ["classifier"]}, ("classifier",), (), None, PIXELS),
}


def _inputs(case):
    key = "pixel_values" if case.inputs is PIXELS else "input_ids"
    return {key: torch.from_numpy(case.inputs)}


@pytest.fixture(scope="module", params=sorted(CASES))
def models(request, tmp_path_factory):
    """(case, base directory, Flax model): one random base model in both frameworks."""
    case = CASES[request.param]
    base = tmp_path_factory.mktemp(request.param) / "base"
    torch.manual_seed(0)
    case.torch_cls(case.config).eval().save_pretrained(base)
    return case, base, case.flax_cls.from_pretrained(base, from_pt=True)


def _torch_model(case, base):
    return case.torch_cls.from_pretrained(base).eval()


def _flax_logits(model, case, adapter, path):
    apply = lambda p, x: model(x, params=p).logits  # noqa: E731
    return np.asarray(jax.jit(vera_jax.adapt(apply, adapter, path=path))(model.params, case.inputs))


@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_adapter_loads_and_matches_peft(models, tmp_path, save_projection):
    case, base, flax_model = models
    kwargs = dict(case.peft_kwargs, **({"task_type": case.task_type} if case.task_type == "SEQ_CLS" else {}))
    config = peft.VeraConfig(r=R, target_modules=case.targets, save_projection=save_projection,
                             projection_prng_key=1234, **kwargs)
    peft_model = peft.get_peft_model(_torch_model(case, base), config).eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad:  # the vectors, and the modules_to_save copies
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
        expected = peft_model(**_inputs(case)).logits.numpy()
        with peft_model.disable_adapter():
            base_logits = peft_model(**_inputs(case)).logits.numpy()
    assert max_rel_error(expected, base_logits) > 100 * TOL
    peft_model.save_pretrained(tmp_path / "adapter")

    if case.kernel_axes:  # GPT-2's (out, in) kernels: without kernel_axes, the message says what was assumed
        with pytest.raises(vera_peft.AdapterFileError, match=r"fan_in_fan_out: is true, but no kernel_axes were given, "
                           r"so transformer/h/0/attn/c_attn's kernel was taken as \(in, out\).*Pass the model's kernel_axes"):
            vera_peft.load_adapter(tmp_path / "adapter", flax_model.params)
    adapter = vera_peft.load_adapter(tmp_path / "adapter", flax_model.params, kernel_axes=case.kernel_axes)
    buffers = peft_model.base_model
    np.testing.assert_array_equal(adapter.projections.A, buffers.vera_A["default"].numpy())  # rebuilt bit for bit
    np.testing.assert_array_equal(adapter.projections.B, buffers.vera_B["default"].numpy())
    assert adapter.config.kernel_axes == case.kernel_axes and adapter.config.projection_seed == 1234
    # Read from the file, or drawn again with PyTorch's generator: either way not this library's draw.
    assert adapter.generator == ("stored" if save_projection else vera_peft.TORCH_GENERATOR)
    assert not adapter.redrawable
    for path in ("merged", "activation"):
        assert max_rel_error(_flax_logits(flax_model, case, adapter, path), expected) < TOL, path
    if not save_projection:  # A and B this library cannot draw: a vera_jax checkpoint must carry them
        assert not adapter.config.save_projection
        checkpoint.save(tmp_path / "checkpoint", adapter)
        restored = checkpoint.restore(tmp_path / "checkpoint", flax_model.params)
        assert restored.config == adapter.config and not restored.redrawable
        np.testing.assert_array_equal(restored.projections.A, adapter.projections.A)
        np.testing.assert_array_equal(restored.projections.B, adapter.projections.B)
        jax.tree.map(np.testing.assert_array_equal, restored.trainable, adapter.trainable)


def _random_adapter(case, flax_model):
    """A vera_jax adapter with random non-zero vectors (and head), and its logits."""
    config = vera_jax.VeraConfig(r=R, target_modules=tuple(case.targets), modules_to_save=case.head,
                                 kernel_axes=case.kernel_axes, projection_seed=3)
    adapter = vera_jax.init_adapter(flax_model.params, config)
    adapter = adapter.replace(trainable=random_like(adapter.trainable, jax.random.key(4), scale=0.5))
    return adapter, _flax_logits(flax_model, case, adapter, "activation")


def test_vera_jax_adapter_loads_in_peft(models, tmp_path):
    case, base, flax_model = models
    adapter, expected = _random_adapter(case, flax_model)
    vera_peft.save_adapter(tmp_path / "adapter", adapter, flax_model.params, task_type=case.task_type)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "VERA" and saved["save_projection"] is True
    assert saved["projection_prng_key"] == 3 and saved["task_type"] == case.task_type

    peft_model = peft.PeftModel.from_pretrained(_torch_model(case, base), tmp_path / "adapter").eval()
    with torch.no_grad():
        logits = peft_model(**_inputs(case)).logits.numpy()
    assert max_rel_error(logits, expected) < TOL
    again = vera_peft.load_adapter(tmp_path / "adapter", flax_model.params, kernel_axes=case.kernel_axes)
    assert jax.tree.structure(again.trainable) == jax.tree.structure(adapter.trainable)
    jax.tree.map(np.testing.assert_array_equal, again.trainable, adapter.trainable)
    np.testing.assert_array_equal(again.projections.A, adapter.projections.A)
    np.testing.assert_array_equal(again.projections.B, adapter.projections.B)
    assert again.config.modules_to_save == adapter.config.modules_to_save


def test_vera_adapter_served_as_lora_gives_its_logits_in_peft(models, tmp_path):
    """lora_A = lambda_d * A[:, :in], lora_B = lambda_b * B[:out], lora_alpha = r: PEFT's LoRA runs VeRA."""
    case, base, flax_model = models
    adapter, expected = _random_adapter(case, flax_model)
    _, factors = save_lora(tmp_path / "lora", adapter, flax_model.params, task_type=case.task_type)
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == saved["lora_alpha"] == R
    assert saved["fan_in_fan_out"] == (case.kernel_axes == ((".*", "oi"),))
    assert all(factor.relative_error == 0.0 for factor in factors)
    peft_model = peft.PeftModel.from_pretrained(_torch_model(case, base), tmp_path / "lora").eval()
    assert isinstance(peft_model.base_model, peft.LoraModel)
    with torch.no_grad():
        logits = peft_model(**_inputs(case)).logits.numpy()
    assert max_rel_error(logits, expected) < TOL


@pytest.mark.parametrize("safetensors", [False, True])
def test_merged_export_loads_with_transformers_alone(models, tmp_path, safetensors):
    case, _, flax_model = models
    adapter, expected = _random_adapter(case, flax_model)
    save_merged(tmp_path / "merged", adapter, flax_model.params, flax_model, safetensors=safetensors)
    weights = {p.name for p in (tmp_path / "merged").iterdir()}
    assert ("model.safetensors" if safetensors else "flax_model.msgpack") in weights
    exported = case.flax_cls.from_pretrained(tmp_path / "merged")
    logits = np.asarray(exported(case.inputs, params=exported.params).logits)
    assert max_rel_error(logits, expected) < TOL
