"""The README's Python examples run as written, in order: a block that starts with ``import jax`` begins an
example of its own, in a fresh namespace (so it imports what it uses); the blocks after it continue it."""

import json
import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    examples: list[dict] = []
    for block in blocks:
        if block.startswith("import jax\n") or not examples:
            examples.append({})
        exec(compile(block, str(README), "exec"), examples[-1])  # noqa: S102 (our own documentation)
    assert len(examples) >= 2  # the linen quickstart and the NNX example, each on its own
    namespace = {name: value for example in examples for name, value in example.items()}
    assert np.isfinite(float(namespace["loss"]))
    assert namespace["nnx_losses"][-1] < namespace["nnx_losses"][0] and namespace["base_unchanged"]
    np.testing.assert_allclose(namespace["pure_logits"], namespace["llama"](namespace["token_ids"]), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(namespace["functional_logits"], namespace["pure_logits"], rtol=1e-5, atol=1e-6)
    assert (tmp_path / "nnx-adapter" / "vera_adapter.json").exists()
    assert (tmp_path / "nnx-peft-adapter" / "adapter_config.json").exists()
    for tunix_export, peft_type in (("tunix-lora", "LORA"), ("tunix-vera", "VERA")):
        saved = json.loads((tmp_path / tunix_export / "adapter_config.json").read_text())
        assert saved["peft_type"] == peft_type and "model.layers.1.self_attn.o_proj" in saved["target_modules"]
    assert namespace["k_losses"].shape == (3,) and len(set(np.asarray(namespace["k_losses"]).tolist())) == 3
    mixed, llama, ids = namespace["mixed_logits"], namespace["llama"], namespace["token_ids"]
    np.testing.assert_allclose(mixed[1], llama(ids)[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mixed[0], mixed[2], rtol=1e-5, atol=1e-6)
    assert float(np.max(np.abs(mixed[0] - mixed[1]))) > 1e-4
    assert (tmp_path / "my-adapter" / "vera_adapter.json").exists()
    assert (tmp_path / "peft-adapter" / "adapter_config.json").exists()
    assert (tmp_path / "merged-model" / "model.safetensors").exists()
    assert (tmp_path / "lora-adapter" / "adapter_config.json").exists()
    assert 0 < max(layer.relative_error for layer in namespace["lora_layers"]) < 1
