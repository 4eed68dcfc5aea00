"""Hugging Face PEFT's VeRA in PyTorch is the reference: same A, B and vectors, same logits."""

import tempfile

import jax
import numpy as np
import pytest
from conftest import max_rel_error, random_like

import vera_jax
from vera_jax.paths import flatten

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

R = 16
TOL = 1e-5


def _bert():
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64, num_labels=3)
    return (transformers.BertForSequenceClassification(cfg), transformers.FlaxBertForSequenceClassification,
            ["query", "value"], dict(modules_to_save=["classifier"]), ("classifier",), ())


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=120, n_embd=48, n_layer=2, n_head=4, n_positions=64)
    return (transformers.GPT2LMHeadModel(cfg), transformers.FlaxGPT2LMHeadModel,
            ["c_attn"], dict(fan_in_fan_out=True), (), ((".*", "oi"),))


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False, rope_theta=10000.0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return (transformers.LlamaForCausalLM(cfg), transformers.FlaxLlamaForCausalLM, targets, {}, (), ())


def _flax_path(torch_name: str) -> str:
    return torch_name.removeprefix("base_model.model.").replace(".", "/")


def _copy(tensor, value):
    with torch.no_grad():
        tensor.copy_(torch.from_numpy(np.array(value)))


@pytest.mark.parametrize("build", [_bert, _gpt2, _llama], ids=["bert", "gpt2", "llama"])
def test_logits_match_peft(build):
    torch.manual_seed(0)
    pt_model, flax_cls, targets, peft_kwargs, modules_to_save, layout = build()
    pt_model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        pt_model.save_pretrained(tmp)
        flax_model = flax_cls.from_pretrained(tmp, from_pt=True)  # transformers' own PyTorch-to-Flax loading
    params = flax_model.params

    config = vera_jax.VeraConfig(r=R, target_modules=tuple(targets), modules_to_save=modules_to_save,
                                 kernel_axes=layout, projection_seed=42)
    adapter = vera_jax.init_adapter(params, config)
    adapter = adapter.replace(trainable=random_like(adapter.trainable, jax.random.key(1), scale=0.5))
    projections = adapter.projections

    peft_config = peft.VeraConfig(r=R, target_modules=targets, vera_dropout=0.0, d_initial=0.1, **peft_kwargs)
    peft_model = peft.get_peft_model(pt_model, peft_config).eval()
    vera_A, vera_B = peft_model.base_model.vera_A["default"], peft_model.base_model.vera_B["default"]
    assert tuple(vera_A.shape) == projections.A.shape and tuple(vera_B.shape) == projections.B.shape
    _copy(vera_A, projections.A)
    _copy(vera_B, projections.B)
    flat = flatten(adapter.trainable)
    adapted = [(n, m) for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.vera.layer.Linear)]
    assert len(adapted) == len(vera_jax.find_layers(params, config))
    for name, module in adapted:
        _copy(module.vera_lambda_d["default"], flat[_flax_path(name) + "/vera_lambda_d"])
        _copy(module.vera_lambda_b["default"], flat[_flax_path(name) + "/vera_lambda_b"])
    if modules_to_save:
        head = peft_model.base_model.model.classifier.modules_to_save["default"]
        _copy(head.weight, np.asarray(flat["classifier/kernel"]).T)
        _copy(head.bias, flat["classifier/bias"])

    assert vera_jax.count_parameters(params, adapter) == peft_model.get_nb_trainable_parameters()

    ids = np.random.default_rng(0).integers(0, 120, size=(2, 10))
    with torch.no_grad():
        expected = peft_model(input_ids=torch.from_numpy(ids)).logits.numpy()
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            base_logits = base(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert max_rel_error(expected, base_logits) > 100 * TOL, "the adapter must change the logits"

    apply = lambda p, x: flax_model(x, params=p).logits  # noqa: E731
    for path in ("merged", "activation"):
        logits = jax.jit(vera_jax.adapt(apply, adapter, path=path))(params, ids)
        assert max_rel_error(logits, expected) < TOL, path
