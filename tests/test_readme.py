"""The README's and docs/' Python examples run as written, in order. A block that starts with ``import jax``
begins an example of its own, in a fresh namespace (so it imports what it uses); the blocks after it
continue it. docs/library.md continues the README's linen quickstart (transformers<5: the legacy environment);
every other file starts afresh."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README, DOCS = ROOT / "README.md", ROOT / "docs"


def blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def run_examples(path: Path, namespace: dict | None = None) -> list[dict]:
    """Each example's namespace after running the file's blocks (the first continuing ``namespace``)."""
    examples = [] if namespace is None else [namespace]
    for block in blocks(path):
        if block.startswith("import jax\n") or not examples:
            examples.append({})
        exec(compile(block, str(path), "exec"), examples[-1])  # noqa: S102 (our own documentation)
    return examples


@pytest.fixture(scope="module")
def readme() -> list[str]:
    """The README's two examples' blocks: the linen quickstart, then the NNX example."""
    examples: list[list[str]] = []
    for block in blocks(README):
        if block.startswith("import jax\n") or not examples:
            examples.append([])
        examples[-1].append(block)
    assert len(examples) == 2  # the linen quickstart and the NNX example, each on its own
    return ["".join(example) for example in examples]


def _run(source: str, path: Path) -> dict:
    namespace: dict = {}
    exec(compile(source, str(path), "exec"), namespace)  # noqa: S102 (our own documentation)
    return namespace


@pytest.mark.hf_flax
def test_the_linen_quickstart_and_docs_library_run(readme, tmp_path, monkeypatch):
    """The README's linen quickstart (transformers' Flax BERT) and docs/library.md, which continues it."""
    monkeypatch.chdir(tmp_path)
    namespace = run_examples(DOCS / "library.md", _run(readme[0], README))[0]
    assert np.isfinite(float(namespace["loss"]))
    assert (tmp_path / "my-adapter" / "vera_adapter.json").exists()
    assert (tmp_path / "peft-adapter" / "adapter_config.json").exists()
    assert (tmp_path / "merged-model" / "model.safetensors").exists()
    assert (tmp_path / "lora-adapter" / "adapter_config.json").exists()
    assert 0 < max(layer.relative_error for layer in namespace["lora_layers"]) < 1


def test_the_nnx_examples_run(readme, tmp_path, monkeypatch):
    """The README's NNX example (tunix's Llama 3) and every other docs/ file with Python blocks (docs/nnx.md)."""
    monkeypatch.chdir(tmp_path)
    examples = [_run(readme[1], README)]
    others = sorted(path for path in DOCS.glob("*.md") if path.name != "library.md" and blocks(path))
    assert [path.name for path in others] == ["nnx.md"]
    for path in others:
        examples += run_examples(path)
    namespace = {name: value for example in examples for name, value in example.items()}
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
