"""Property-based fuzzing of the adapter formats: every mutated file is refused with `AdapterFileError` or
loads exactly the original adapter, and the caller's params are never touched.

Hypothesis runs with a fixed seed (``derandomize``) and a fixed budget, so CI sees the same files every run:
300 files per format, or ``VERA_JAX_FUZZ_EXAMPLES`` (``VERA_JAX_FUZZ_EXAMPLES=5000 make test`` for a deeper run).
A mutation picks one file of a saved adapter and flips a byte, truncates it, overwrites a span with random
bytes, or (for JSON files) replaces one value with another JSON value.
"""

import json
import os
import shutil
import uuid
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import families
import vera_jax
from train.engine.checkpoints import CheckpointMismatch, RunCheckpoints
from vera_jax import checkpoint
from vera_jax import peft as vera_peft

EXAMPLES = int(os.environ.get("VERA_JAX_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


def _json_containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    """JSON lists and objects of `inner` values.

    A named function, not a lambda: Hypothesis describes a lambda by parsing its source, and on CPython 3.11 that
    parse can fail with a SystemError when it happens deep in a recursive draw.
    """
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=8),
                           _json_containers, max_leaves=6)


def _json_paths(value, prefix=()):
    """Every position in a JSON document: key paths to its values."""
    yield prefix
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from _json_paths(child, prefix + (key,))


def _replaced(document, path, new):
    if not path:
        return new
    document[path[0]] = _replaced(document[path[0]], path[1:], new)
    return document


def _mutate(data: bytes, is_json: bool, draw) -> bytes:
    kinds = ["flip", "truncate", "splice"] + (["json"] if is_json else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "json":
        document = json.loads(data)
        path = draw(st.sampled_from(list(_json_paths(document))))
        return json.dumps(_replaced(document, path, draw(JSON_VALUES))).encode()
    if not data:
        return b"\x00"
    at = draw(st.integers(0, len(data) - 1))
    if kind == "flip":
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    if kind == "truncate":
        return data[:at]
    noise = draw(st.binary(min_size=1, max_size=16))
    return data[:at] + noise + data[at + len(noise):]


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return False
    return True


def _same_tensors(got: vera_jax.Adapter, want: vera_jax.Adapter) -> bool:
    trees = (got.trainable, got.projections.A, got.projections.B), (want.trainable, want.projections.A,
                                                                   want.projections.B)
    if jax.tree.structure(trees[0]) != jax.tree.structure(trees[1]):
        return False
    return all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(*map(jax.tree.leaves, trees)))


class Fuzzer:
    """Mutates copies of one saved adapter directory and tallies what loading them does."""

    def __init__(self, original: Path, scratch: Path, load, same, refusal=vera_jax.AdapterFileError):
        self.files = {p.relative_to(original): p.read_bytes() for p in sorted(original.rglob("*")) if p.is_file()}
        self.original, self.scratch, self.load, self.same, self.refusal = original, scratch, load, same, refusal
        self.refused = self.loaded = 0

    def run(self, draw) -> None:
        name = draw(st.sampled_from(sorted(self.files)))
        data = self.files[name]
        directory = self.scratch / uuid.uuid4().hex  # a new path each time: no reader cache sees the original
        shutil.copytree(self.original, directory)
        (directory / name).write_bytes(_mutate(data, _is_json(data), draw))
        try:
            got = self.load(directory)
        except self.refusal:
            self.refused += 1
        else:
            assert self.same(got), f"{name}: a mutated file loaded other values than the original"
            self.loaded += 1
        finally:
            shutil.rmtree(directory)
            shutil.rmtree(directory.parent / f"{directory.name}-damaged", ignore_errors=True)


def _fuzz(fuzzer: Fuzzer) -> None:
    @FUZZ
    @given(st.data())
    def example(data):
        fuzzer.run(data.draw)

    example()
    print(f"{fuzzer.original.name}: {fuzzer.refused} refused, {fuzzer.loaded} loaded identically")
    assert fuzzer.refused + fuzzer.loaded == EXAMPLES and fuzzer.refused >= EXAMPLES // 10


@pytest.fixture(scope="module")
def bert():
    return families.bert()


def _host_copy(params):
    return jax.tree.map(np.array, params)


def test_mutated_vera_jax_adapters_are_refused_or_load_the_original(bert, tmp_path):
    adapter = families.random_adapter(bert, seed=1)
    checkpoint.save(tmp_path / "vera_jax_adapter", adapter, bert.params)
    params = _host_copy(bert.params)
    fuzzer = Fuzzer(tmp_path / "vera_jax_adapter", tmp_path, lambda d: checkpoint.restore(d, params),
                    lambda got: _same_tensors(got, adapter) and got.config == adapter.config)
    _fuzz(fuzzer)
    jax.tree.map(np.testing.assert_array_equal, params, bert.params)  # the caller's params untouched


def test_mutated_peft_adapters_are_refused_or_load_the_original(bert, tmp_path):
    adapter = families.random_adapter(bert, seed=1)
    vera_peft.save_adapter(tmp_path / "peft_adapter", adapter, bert.params)
    params = _host_copy(bert.params)
    original = vera_peft.load_adapter(tmp_path / "peft_adapter", params)
    fuzzer = Fuzzer(tmp_path / "peft_adapter", tmp_path, lambda d: vera_peft.load_adapter(d, params),
                    lambda got: _same_tensors(got, original) and vera_jax.find_layers(params, got.config) ==
                    vera_jax.find_layers(params, original.config))
    _fuzz(fuzzer)
    jax.tree.map(np.testing.assert_array_equal, params, bert.params)


def test_mutated_run_checkpoints_are_refused_or_resume_the_original(tmp_path):
    state = {"trainable": {"lambda_d": np.linspace(0, 1, 8, dtype=np.float32)},
             "opt_state": {"mu": np.arange(8, dtype=np.float32), "count": np.array(3, np.int32)}}
    meta = {"options": {"r": 8, "lr": 0.01}, "projection": {"key": [0, 11]}, "data": {"sha256": "ab" * 32},
            "position": {"epoch": 1, "batch": 17}}
    checkpoints = RunCheckpoints(tmp_path / "checkpoints", keep=2)
    checkpoints.save(5, state, meta)
    checkpoints.close()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    expected = {key: meta[key] for key in ("options", "projection", "data")}

    def resume(directory):
        run = RunCheckpoints(directory, keep=2)
        try:
            return run.restore(abstract, expected)
        finally:
            run.close()

    def same(resumed):
        step, got, got_meta = resumed
        return (step == 5 and {k: got_meta[k] for k in meta} == meta and jax.tree.structure(got) ==
                jax.tree.structure(state) and all(a.dtype == b.dtype and np.array_equal(a, b)
                                                  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state))))

    _fuzz(Fuzzer(tmp_path / "checkpoints", tmp_path, resume, same, refusal=CheckpointMismatch))
