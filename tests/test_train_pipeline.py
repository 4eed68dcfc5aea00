"""The real entry point on a tiny model: outputs, resume after SIGKILL, sharding, multi-process, bad input."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import tiny_run
import vera_jax
from train.__main__ import COMMANDS, main
from vera_jax import checkpoint
from vera_jax.layers import LAMBDA_B, LAMBDA_D
from vera_jax.paths import flatten

EXPORT = ("export", "--backend", "linen")  # the tiny models carry Flax weights: their adapters are linen's


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return tiny_run.make_model(root / "model"), tiny_run.make_csv(root / "data.csv")


def _adapter(model_dir, out):
    """(the trainable leaves flat by path, the base params, the restored vera_jax.Adapter) of a run or an adapter."""
    from transformers import FlaxBertForSequenceClassification

    params = FlaxBertForSequenceClassification.from_pretrained(model_dir).params
    directory = out if (out / checkpoint.METADATA_FILE).exists() else out / "adapter"  # an adapter, or a run
    adapter = checkpoint.restore(directory, params)
    return {k: np.asarray(v) for k, v in flatten(adapter.trainable).items()}, params, adapter


@pytest.mark.hf_flax
def test_entry_point_writes_every_output_and_learns(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "run"
    # A random tiny BERT carries little of its input to [CLS]: high learning rates, a dozen epochs.
    assert main(tiny_run.train_args(model, data, out, "--epochs", "12", "--lr-vectors", "0.3", "--lr-head", "0.3",
                                    "--baseline", "--checkpoint-every", "50")) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("test_accuracy", "trainable_params", "adapter_bytes", "wall_seconds", "tokens_per_second",
                "baseline_accuracy"):
        assert key in summary
    assert (out / "curves.png").stat().st_size > 10_000
    loss = tiny_run.losses(out)
    assert np.mean(loss[-10:]) < 0.85 * np.mean(loss[:10])
    assert summary["test_accuracy"] > max(0.6, summary["baseline_accuracy"])

    # The adapter holds the trainable leaves and the key: no base weights, no A/B.
    vectors, params, adapter = _adapter(model, out)
    raw = sum(v.nbytes for v in vectors.values())
    assert summary["trainable_params"] * 4 == raw
    assert summary["adapter_bytes"] <= 2 * raw + 64 * 1024
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    assert summary["adapter_bytes"] < base_bytes / 4
    assert not any(p.startswith(("bert/", "projections")) and "vera_lambda" not in p for p in vectors)
    # The rebuilt projections are the ones the run trained with (fingerprint checked on restore).
    assert adapter.projections.A.shape == (8, 32)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(kept) == 2, kept  # --keep-checkpoints 2 by default


@pytest.mark.hf_flax
def test_entry_point_runs_an_ablation_and_resumes_it(tiny, tmp_path, capsys):
    """Per-layer pairs, lambda_b alone, Kaiming-normal: trained, saved without a PEFT copy, and resumable."""
    model, data = tiny
    out = tmp_path / "run"
    args = tiny_run.train_args(model, data, out, "--max-steps", "6", "--projection-sharing", "per_layer",
                               "--train-vectors", "lambda_b", "--projection-init", "kaiming_normal")
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    vectors, params, adapter = _adapter(model, out)
    config = adapter.config
    assert (config.projection_sharing, config.train_vectors, config.projection_init) == (
        "per_layer", "lambda_b", "kaiming_normal")
    assert adapter.projections.A.shape == (4, 8, 32)  # query and value of 2 layers, each its own pair
    assert not any(path.endswith(LAMBDA_D) for path in vectors)
    assert summary["trainable_params"] == 4 * 32 + 32 * 2 + 2  # lambda_b per layer, plus the head
    assert not (out / "peft_adapter").exists()
    capsys.readouterr()
    assert main(args) == 0  # the same command again resumes the finished run
    assert "resumed" in capsys.readouterr().out
    assert main(tiny_run.train_args(model, data, tmp_path / "bad", "--projection-init", "orthogonal")) == 2
    assert ("argument --projection-init: invalid choice: 'orthogonal' (choose from 'kaiming_uniform', "
            "'kaiming_normal', 'uniform')") in capsys.readouterr().err


@pytest.mark.hf_flax
def test_sigkill_mid_training_resumes_to_the_same_vectors(tiny, tmp_path, capsys):
    model, data = tiny
    args = lambda out: tiny_run.train_args(model, data, out, "--epochs", "4", "--checkpoint-every", "5")  # noqa: E731
    straight = tmp_path / "straight"
    assert main(args(straight)) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "XLA_FLAGS": tiny_run.xla_flags(1)}
    process = subprocess.Popen([sys.executable, "-m", "train", *args(killed)], cwd=tiny_run.REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "10").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    # A write cut short leaves only Orbax's temporary directory, which must never be read as a step.
    partial = killed / "checkpoints" / "15.orbax-checkpoint-tmp-1234567"
    partial.mkdir(exist_ok=True)
    (partial / "garbage").write_text("half a checkpoint")

    capsys.readouterr()
    assert main(args(killed)) == 0
    assert "resumed from the checkpoint at step" in capsys.readouterr().out
    first, _, _ = _adapter(model, straight)
    second, _, _ = _adapter(model, killed)
    assert first.keys() == second.keys()
    for path in first:
        np.testing.assert_array_equal(second[path], first[path], err_msg=path)
    assert json.loads((killed / "summary.json").read_text())["test_accuracy"] == \
        json.loads((straight / "summary.json").read_text())["test_accuracy"]


def _two_processes(args: list[str], port: int, devices: int) -> list[tuple[str, str]]:
    """``python -m train ARGS`` as processes 0 and 1 of a two-process run on 127.0.0.1:port, each with ``devices``
    simulated CPU devices; their (stdout, stderr) once both exited 0."""
    env = {**os.environ, "XLA_FLAGS": tiny_run.xla_flags(devices), "JAX_PLATFORMS": "cpu"}
    processes = [subprocess.Popen([sys.executable, "-m", "train", *args, "--coordinator", f"127.0.0.1:{port}",
                                   "--num-processes", "2", "--process-id", str(i)],
                                  cwd=tiny_run.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs[0][1][-3000:] + outputs[1][1][-3000:]
    return outputs


@pytest.mark.hf_flax
def test_sharded_and_multiprocess_runs_match_one_device(tiny, tmp_path):
    """One device against a 4x2 mesh of 8 devices held by two processes (data and model axes both cross the
    processes' devices), then --path auto across two processes."""
    model, data = tiny
    # Batches of 16 in two length groups: whole rows on every device of each mesh.
    args = lambda out, *extra: tiny_run.train_args(model, data, out, "--max-steps", "6", "--batch-size", "16",  # noqa: E731
                                                   "--length-groups", "2", *extra)
    single = tmp_path / "single"
    assert main(args(single)) == 0
    sharded = tmp_path / "sharded"
    port = 20000 + os.getpid() % 20000
    _two_processes(args(sharded, "--mesh", "4x2"), port, devices=4)
    assert json.loads((sharded / "summary.json").read_text())["mesh"] == {"data": 4, "fsdp": 2}

    # --path auto: process 0 times the paths and both processes compile the plan it picked.
    auto = tmp_path / "auto"
    outputs = _two_processes(args(auto, "--mesh", "2x2", "--path", "auto"), port + 1, devices=2)
    assert "measured whole steps of the model on this device" in outputs[0][0] and "auto:" not in outputs[1][0]

    reference, _, _ = _adapter(model, single)
    other, _, _ = _adapter(model, sharded)
    for path in reference:
        np.testing.assert_allclose(other[path], reference[path], rtol=1e-5, atol=1e-6, err_msg=path)
    np.testing.assert_allclose(tiny_run.losses(sharded), tiny_run.losses(single), rtol=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--label-column", "stars"], "has no column 'stars'; its columns are \\['text', 'label'\\]"),
    (["--num-labels", "1"], "Classification needs at least 2 classes|labels must be 0..num_labels-1"),
    (["--mesh", "2x1"], "Mesh 2x1 needs 2 devices, but there are 1"),
    (["--targets", "q_proj"], "matches no module"),
    (["--batch-size", "1000"], "fewer than one batch of 1000"),
])
@pytest.mark.hf_flax
def test_bad_input_is_refused_before_compute(tiny, tmp_path, capsys, extra, message):
    model, data = tiny
    assert main(tiny_run.train_args(model, data, tmp_path / "run", *extra)) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.hf_flax
def test_bad_files_models_and_directories(tiny, tmp_path, capsys):
    model, data = tiny
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    assert main(tiny_run.train_args(model, empty, tmp_path / "a")) == 2
    assert "is empty" in capsys.readouterr().err
    labels = tiny_run.make_csv(tmp_path / "three.csv")
    labels.write_text(labels.read_text().replace(",1\n", ",3\n", 1))
    assert main(tiny_run.train_args(model, labels, tmp_path / "b", "--num-labels", "2")) == 2
    assert "Labels span 0..3 but the head has 2 outputs" in capsys.readouterr().err
    not_flax = tmp_path / "t5"
    not_flax.mkdir()
    (not_flax / "config.json").write_text(json.dumps({"model_type": "t5"}))
    (not_flax / "model.safetensors").write_bytes(b"")  # weights are checked for first; never read here
    assert main(tiny_run.train_args(not_flax, data, tmp_path / "c")) == 2
    assert "'t5' model, which has no Flax sequence-classification class" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(tiny_run.train_args(model, data, blocker / "run")) == 2
    assert "Cannot write to --output-dir" in capsys.readouterr().err


@pytest.mark.hf_flax
def test_checkpoint_from_another_config_is_refused(tiny, tmp_path, capsys):
    model, data = tiny
    out = tmp_path / "run"
    assert main(tiny_run.train_args(model, data, out, "--max-steps", "2")) == 0
    assert main(tiny_run.train_args(model, data, out, "--max-steps", "2", "--d-initial", "0.5")) == 2
    assert "written with different options (['d_initial'])" in capsys.readouterr().err


@pytest.mark.hf_flax
def test_batch_that_does_not_divide_the_mesh(tiny, tmp_path):
    model, data = tiny
    result = tiny_run.run_subprocess(tiny_run.train_args(model, data, tmp_path / "run", "--batch-size", "12"),
                                     devices=8)
    assert result.returncode == 2
    assert "Batch size 12 does not divide over the 8 devices" in result.stderr


@pytest.mark.hf_flax
def test_regression_task_on_float_labels(tiny, tmp_path):
    model, data = tiny
    scores = tmp_path / "scores.csv"
    rows = data.read_text().splitlines()
    scores.write_text("\n".join([rows[0]] + [f"{r.rsplit(',', 1)[0]},{2.0 * int(r.rsplit(',', 1)[1]) - 1.0:.1f}"
                                             for r in rows[1:]]) + "\n")
    out = tmp_path / "run"
    assert main(tiny_run.train_args(model, scores, out, "--task", "regression", "--max-steps", "4")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "regression" and np.isfinite(summary["test_loss"])
    from transformers import FlaxBertForSequenceClassification

    params = FlaxBertForSequenceClassification.from_pretrained(model, num_labels=1, ignore_mismatched_sizes=True).params
    adapter = checkpoint.restore(out / "adapter", params)
    assert adapter.trainable["classifier"]["kernel"].shape == (32, 1)


@pytest.mark.hf_flax
def test_export_command_writes_peft_and_merged_models(tiny, tmp_path, capsys):
    from transformers import FlaxBertForSequenceClassification

    from vera_jax import peft as vera_peft

    model, data = tiny
    run_dir = tmp_path / "run"
    assert main(tiny_run.train_args(model, data, run_dir, "--max-steps", "3", "--lr-head", "0.3",
                                    "--lr-vectors", "0.3")) == 0
    base = FlaxBertForSequenceClassification.from_pretrained(model)
    adapter = checkpoint.restore(run_dir / "adapter", base.params)
    ids = np.asarray([[2, 5, 15, 16, 3], [2, 12, 18, 20, 3]])
    apply = lambda p, x: base(x, params=p).logits  # noqa: E731
    expected = np.asarray(vera_jax.adapt(apply, adapter, path="activation")(base.params, ids))

    for fmt in ("peft", "lora", "flax", "safetensors"):
        out = tmp_path / fmt
        args = [*EXPORT, "--adapter", str(run_dir / "adapter"), "--model", str(model), "--format", fmt,
                "--output", str(out)]
        assert main(args) == 0, capsys.readouterr().err
        assert main(args) == 0, capsys.readouterr().err  # an earlier export of the same kind is replaced
        if fmt == "lora":  # lora_B @ lora_A is each layer's delta: the merged kernel minus the base kernel
            tensors = load_file(out / "adapter_model.safetensors")
            merged, kernels = flatten(vera_jax.merge(base.params, adapter)), flatten(base.params)
            modules = [k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in tensors
                       if k.endswith("lora_A.weight")]
            assert len(modules) == 4  # query and value of both layers
            for module in modules:
                prefix, kernel = f"base_model.model.{module}", module.replace(".", "/") + "/kernel"
                delta = tensors[f"{prefix}.lora_B.weight"] @ tensors[f"{prefix}.lora_A.weight"]
                np.testing.assert_allclose(delta.T, merged[kernel] - kernels[kernel], rtol=1e-4, atol=1e-6)
            continue
        if fmt == "peft":
            again = vera_peft.load_adapter(out, base.params)
            logits = vera_jax.adapt(apply, again, path="activation")(base.params, ids)
        else:
            merged = FlaxBertForSequenceClassification.from_pretrained(out)
            logits = merged(ids, params=merged.params).logits
        np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5, err_msg=fmt)
    assert main([*EXPORT, "--adapter", str(run_dir / "adapter"), "--model", str(model), "--format", "lora",
                 "--rank", "2", "--output", str(tmp_path / "lora-2")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("rank 2  relative error") == 4
    assert main([*EXPORT, "--adapter", str(run_dir / "adapter"), "--model", str(model), "--format", "peft",
                 "--rank", "2", "--output", str(tmp_path / "x")]) == 2
    assert "--rank 2 applies to --format lora only" in capsys.readouterr().err
    # The run itself also wrote the PEFT form of its adapter.
    assert (run_dir / "peft_adapter" / "adapter_model.safetensors").exists()
    capsys.readouterr()
    assert main([*EXPORT, "--adapter", str(tmp_path), "--output", str(tmp_path / "x")]) == 2
    assert "holds neither vera_adapter.json (vera_jax) nor adapter_config.json (PEFT)" in capsys.readouterr().err

    # A directory of someone else's files is never replaced, in any format: one line, exit 2, files kept.
    foreign = tmp_path / "my-notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for fmt in ("peft", "safetensors"):
        assert main([*EXPORT, "--adapter", str(run_dir / "adapter"), "--model", str(model), "--format", fmt,
                     "--output", str(foreign)]) == 2
        err = capsys.readouterr().err
        assert "already holds files" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert (foreign / "notes.txt").read_text() == "keep me"
    # --overwrite writes there all the same, and keeps the old files aside.
    assert main([*EXPORT, "--adapter", str(run_dir / "adapter"), "--model", str(model), "--output", str(foreign),
                 "--overwrite"]) == 0
    assert (foreign / "adapter_config.json").is_file()
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("my-notes.replaced-")]
    assert len(kept) == 1 and (kept[0] / "notes.txt").read_text() == "keep me"
    # A merged model is not a PEFT adapter either: exporting PEFT files over it is refused.
    assert main([*EXPORT, "--adapter", str(run_dir / "adapter"), "--model", str(model), "--output",
                 str(tmp_path / "flax")]) == 2
    assert "has no vera_jax_manifest.json naming a peft-vera" in capsys.readouterr().err
    assert (tmp_path / "flax" / "flax_model.msgpack").exists()


@pytest.mark.hf_flax
@pytest.mark.parametrize("path", ["auto", "activation-lean"])
def test_other_paths_train_to_the_same_vectors(tiny, tmp_path, path):
    model, data = tiny
    args = lambda out, p: tiny_run.train_args(model, data, out, "--max-steps", "4", "--path", p)  # noqa: E731
    assert main(args(tmp_path / "merged", "merged")) == 0
    assert main(args(tmp_path / path, path)) == 0
    summary = json.loads((tmp_path / path / "summary.json").read_text())
    assert summary["path"] == path
    if path == "auto":
        assert summary["path_detail"].startswith("auto: ")
    reference, _, _ = _adapter(model, tmp_path / "merged")
    other, _, _ = _adapter(model, tmp_path / path)
    for leaf in reference:
        np.testing.assert_allclose(other[leaf], reference[leaf], rtol=1e-4, atol=1e-6, err_msg=leaf)


@pytest.mark.hf_flax
@pytest.mark.parametrize("dropout_flag", [[], ["--no-dropout"]])
def test_bench_command_prints_and_writes_every_ratio(tmp_path, capsys, dropout_flag):
    model = tiny_run.make_model(tmp_path / "model", weights=("pytorch", "flax"))
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(model), "--batch-size", "4", "--seq-len", "16", "--r", "8",
                 "--steps", "2", "--warmup", "1", "--settle", "0", "--json", str(out), *dropout_flag]) == 0
    results = json.loads(out.read_text())
    assert results["workload"]["model_dropout"] is not bool(dropout_flag)
    assert set(results["median_seconds"]) == {"merged", "activation", "activation-lean", "auto", "floor", "peft"}
    assert all(t > 0 for t in results["median_seconds"].values())
    median = results["median_seconds"]
    assert all(low <= median[name] <= high for name, (low, high) in results["spread_seconds"].items())
    assert all(results["peak_bytes"][name] > 0 for name in ("merged", "activation", "auto", "floor"))
    # The ratios the console shows are those of the file.
    printed = next(json.loads(line) for line in capsys.readouterr().out.splitlines() if '"floor_ratio"' in line)
    for ratio in ("floor_ratio", "peft_speedup", "auto_vs_best"):
        assert math.isfinite(results[ratio]) and results[ratio] > 0
        assert printed[ratio] == round(results[ratio], 3)


@pytest.mark.hf_flax
def test_bench_multi_times_programs_that_compute_what_single_adapters_do(tiny, tmp_path, capsys):
    """The timed K-adapter training program gives each adapter the step it would get alone on its batch, in
    passes of two, all at once and with one batch for all; the timed mixed batch gives each row its own adapter's
    logits."""
    model, _ = tiny
    out = tmp_path / "multi.json"
    assert main(["bench-multi", "--model", str(model), "--r", "8", "--ks", "1", "4", "--ns", "1", "4",
                 "--train-batch", "4", "--train-seq-len", "16", "--serve-batch", "8", "--serve-seq-len", "16",
                 "--adapters-per-pass", "2", "--repeats", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    training, serving = results["training"], results["serving"]
    assert training["4"]["adapters_per_pass"] == 2
    for k in ("1", "4"):
        assert training[k]["max_difference_from_single_steps"] < 1e-6, training[k]
        assert training[k]["vmapped_seconds"] > 0 and training[k]["all_at_once_seconds"] > 0
    assert training["4"]["shared_batch_seconds"] > 0 and "shared_batch_seconds" not in training["1"]
    for n in ("1", "4"):
        assert serving[n]["max_difference_from_one_adapter"] < 1e-5, serving[n]
    assert training["4"]["all_at_once_peak_bytes"] > training["1"]["vmapped_peak_bytes"] > 0
    assert "mixed_batch_ratio_4" in capsys.readouterr().out


@pytest.mark.hf_flax
def test_bench_multi_against_peft(tmp_path):
    """PEFT's grouped forwards (one per adapter, as PEFT serves VeRA) hold the very adapters of the mixed batch:
    every row's logits agree. PEFT's sweep trains each of its K adapters, and only it, on its own batch."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from train.bench.multi_peft import PeftSweepTrainer

    model = tiny_run.make_model(tmp_path / "model", weights=("pytorch", "flax"))
    out = tmp_path / "multi.json"
    assert main(["bench-multi", "--model", str(model), "--r", "8", "--ks", "1", "2", "--ns", "1", "4",
                 "--train-batch", "2", "--train-seq-len", "8", "--serve-batch", "8", "--serve-seq-len", "16",
                 "--repeats", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    for n in ("1", "4"):
        row = results["serving"][n]
        assert row["max_difference_from_peft"] < 1e-5, row
        assert results[f"serve_vs_peft_n{n}"] == pytest.approx(row["peft_grouped_seconds"] / row["mixed_seconds"])
    for k in ("1", "2"):
        row = results["training"][k]
        assert results[f"sweep_vs_peft_k{k}"] == pytest.approx(row["peft_seconds"] / row["vmapped_seconds"])

    rng = np.random.default_rng(0)
    batches = {"input_ids": rng.integers(5, 20, (2, 4, 8)), "attention_mask": np.ones((2, 4, 8), np.int64),
               "labels": rng.integers(0, 2, (2, 4))}
    sweep = PeftSweepTrainer(str(model), 8, ["query", "value"], batches)
    before = {name: [p.detach().clone() for p in sweep.parameters(name)] for name in sweep.names}
    assert all(len(tensors) == 2 * 2 * 2 + 2 for tensors in before.values())  # 2 vectors x 4 layers + the head
    sweep()
    for name in sweep.names:  # lambda_b and the head move; lambda_d's first gradient is zero (lambda_b starts at 0)
        changed = [not torch.equal(b, a) for b, a in zip(before[name], sweep.parameters(name))]
        assert sum(changed) == 2 * 2 + 2, (name, changed)


@pytest.mark.hf_flax
def test_sweep_trains_k_adapters_like_separate_runs(tiny, tmp_path, capsys):
    model, data = tiny
    grid_dir, single_dir = tmp_path / "grid", tmp_path / "single"
    # Groups padded to 16 tokens, the --max-length: the seeds' stacked groups pad alike, so the model's dropout
    # draws the masks of a single-seed sweep.
    args = lambda out, *grid: ["sweep", *tiny_run.train_args(model, data, out, "--max-steps", "4",  # noqa: E731
                                                              "--lr-vectors", "0.1", "--lr-head", "0.1",
                                                              "--pad-multiple", "16", *grid)]
    # Two passes of two vmapped adapters, looped in one program: d1-seed1 trains in the second pass.
    assert main(args(grid_dir, "--d-initials", "1e-7", "1.0", "--seeds", "0", "1", "--adapters-per-pass", "2")) == 0
    summary = json.loads((grid_dir / "sweep.json").read_text())
    assert len(summary["grid"]) == 4 and set(summary["mean_accuracy_by_d_initial"]) == {"1e-07", "1"}
    assert (grid_dir / "sweep.png").stat().st_size > 10_000
    assert main(args(single_dir, "--d-initials", "1.0", "--seeds", "1")) == 0
    vmapped, _, vmapped_adapter = _adapter(model, grid_dir / "adapters" / "d1-seed1")
    alone, _, _ = _adapter(model, single_dir / "adapters" / "d1-seed1")
    for path in alone:
        np.testing.assert_allclose(vmapped[path], alone[path], rtol=1e-5, atol=1e-6, err_msg=path)
    assert not np.allclose(vmapped["bert/encoder/layer/0/attention/self/query/vera_lambda_d"], 1.0)
    # Each adapter is saved with its own point's config.
    assert vmapped_adapter.config.d_initial == 1.0
    assert _adapter(model, grid_dir / "adapters" / "d1e-07-seed0")[2].config.d_initial == 1e-7
    assert "mean accuracy" in capsys.readouterr().out


@pytest.mark.hf_flax
def test_a_sweep_reports_its_diverged_adapters_and_fails_when_all_diverge(tiny, tmp_path, capsys):
    """A point whose loss or vectors stop being finite gets no accuracy and no saved adapter; the others stand.
    On the activation path, d_initial 3e38 (near float32's largest) overflows lambda_d * (A x) at once."""
    model, data = tiny
    args = lambda out, *grid: ["sweep", *tiny_run.train_args(model, data, out, "--max-steps", "4",  # noqa: E731
                                                              "--log-every", "1", "--lr-vectors", "0.1", "--path",
                                                              "activation", *grid)]
    assert main(args(tmp_path / "some", "--d-initials", "1.0", "3e38", "--seeds", "0")) == 0
    summary = json.loads((tmp_path / "some" / "sweep.json").read_text())
    rows = {row["d_initial"]: row for row in summary["grid"]}
    assert rows[1.0]["diverged_at_step"] is None and 0 <= rows[1.0]["test_accuracy"] <= 1
    assert 1 <= rows[3e38]["diverged_at_step"] <= 4 and rows[3e38]["test_accuracy"] is None
    assert summary["mean_accuracy_by_d_initial"] == {"1": rows[1.0]["test_accuracy"], "3e+38": None}
    assert sorted(p.name for p in (tmp_path / "some" / "adapters").iterdir()) == ["d1-seed0"]
    assert f"diverged at {rows[3e38]['diverged_at_step']}" in capsys.readouterr().out
    assert main(args(tmp_path / "all", "--d-initials", "3e38", "--seeds", "0", "1")) == 2
    assert "error: Every adapter of the sweep diverged (the first at step" in capsys.readouterr().err
    assert not (tmp_path / "all" / "sweep.json").exists() and not (tmp_path / "all" / "adapters").exists()


@pytest.mark.hf_flax
def test_a_one_point_sweep_is_the_run_with_the_same_flags(tiny, tmp_path):
    """A flag that changes a run (--dropout, here on the activation path) changes the sweep the same way."""
    model, data = tiny
    flags = ("--max-steps", "4", "--lr-vectors", "0.1", "--lr-head", "0.1", "--path", "activation", "--d-initial",
             "0.5", "--seed", "0")
    run_args = lambda out, *extra: tiny_run.train_args(model, data, out, *flags, *extra)  # noqa: E731
    assert main(run_args(tmp_path / "run", "--dropout", "0.3")) == 0
    assert main(["sweep", *run_args(tmp_path / "sweep", "--dropout", "0.3", "--seeds", "0")]) == 0
    assert main(["sweep", *run_args(tmp_path / "plain", "--seeds", "0")]) == 0
    run, _, _ = _adapter(model, tmp_path / "run")
    swept, _, swept_adapter = _adapter(model, tmp_path / "sweep" / "adapters" / "d0.5-seed0")
    plain, _, _ = _adapter(model, tmp_path / "plain" / "adapters" / "d0.5-seed0")
    assert swept_adapter.config.dropout == 0.3
    for path in run:
        np.testing.assert_allclose(swept[path], run[path], rtol=1e-5, atol=1e-6, err_msg=path)
    assert max(np.abs(plain[path] - swept[path]).max() for path in run) > 1e-3  # the dropout was not dropped


@pytest.mark.hf_flax
def test_sweep_of_a_frozen_lambda_d_trains_each_d_initial_as_its_own_model(tiny, tmp_path):
    """With lambda_b alone trained, lambda_d is the constant d_initial of the config: each value is its own
    program, saved with its own config, and equal to the run with that --d-initial."""
    model, data = tiny
    flags = ("--max-steps", "3", "--lr-vectors", "0.1", "--train-vectors", "lambda_b")
    assert main(["sweep", *tiny_run.train_args(model, data, tmp_path / "sweep", *flags, "--d-initials", "0.1",
                                                "0.5", "--seeds", "0")]) == 0
    assert main(tiny_run.train_args(model, data, tmp_path / "run", *flags, "--d-initial", "0.5")) == 0
    run, _, _ = _adapter(model, tmp_path / "run")
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["grid"]
    assert [(r["d_initial"], r["train_vectors"]) for r in rows] == [(0.1, "lambda_b"), (0.5, "lambda_b")]
    small, _, small_adapter = _adapter(model, tmp_path / "sweep" / "adapters" / "lambda_b-d0.1-seed0")
    large, _, large_adapter = _adapter(model, tmp_path / "sweep" / "adapters" / "lambda_b-d0.5-seed0")
    assert (small_adapter.config.d_initial, large_adapter.config.d_initial) == (0.1, 0.5)
    assert not any(path.endswith(LAMBDA_D) for path in large)
    for path in run:
        np.testing.assert_allclose(large[path], run[path], rtol=1e-5, atol=1e-6, err_msg=path)
    assert max(np.abs(small[path] - large[path]).max() for path in run if path.endswith(LAMBDA_B)) > 1e-4


@pytest.mark.hf_flax
def test_sweep_varies_the_papers_ablations(tiny, tmp_path, capsys):
    """Each ablation variant is its own vmapped program; its adapters match a sweep of that variant alone."""
    model, data = tiny
    grid_dir, single_dir = tmp_path / "grid", tmp_path / "single"
    # Groups padded to 16 tokens, the --max-length: the seeds' stacked groups pad alike, so the model's dropout
    # draws the masks of a single-seed sweep.
    args = lambda out, *grid: ["sweep", *tiny_run.train_args(model, data, out, "--max-steps", "3",  # noqa: E731
                                                              "--lr-vectors", "0.1", "--lr-head", "0.1",
                                                              "--pad-multiple", "16", *grid)]
    assert main(args(grid_dir, "--d-initials", "0.1", "--seeds", "0", "1", "--train-vectors", "both", "lambda_d",
                     "--projection-sharings", "shared", "per_layer", "--projection-inits", "kaiming_normal")) == 0
    summary = json.loads((grid_dir / "sweep.json").read_text())
    assert len(summary["grid"]) == 8
    assert set(summary["mean_accuracy"]) == {"kaiming_normal d=0.1", "kaiming_normal+lambda_d d=0.1",
                                             "kaiming_normal+per_layer d=0.1",
                                             "kaiming_normal+per_layer+lambda_d d=0.1"}
    counts = {row["train_vectors"]: row["trainable_params"] for row in summary["grid"]}
    assert counts["both"] - counts["lambda_d"] == 2 * (32 + 32)  # lambda_b of query and value in 2 layers
    assert "kaiming_normal+per_layer+lambda_d d=0.1: mean accuracy" in capsys.readouterr().out
    # The single-valued spelling of the main job's flags works in a sweep too.
    assert main(args(single_dir, "--d-initial", "0.1", "--seeds", "1", "--train-vectors", "lambda_d",
                     "--projection-sharing", "per_layer", "--projection-init", "kaiming_normal")) == 0
    name = "kaiming_normal+per_layer+lambda_d-d0.1-seed1"
    vmapped, _, vmapped_adapter = _adapter(model, grid_dir / "adapters" / name)
    alone, _, _ = _adapter(model, single_dir / "adapters" / name)
    assert vmapped_adapter.config.b_initial == 1.0 and vmapped_adapter.projections.A.ndim == 3
    assert not any(path.endswith(LAMBDA_B) for path in alone)
    for path in alone:
        np.testing.assert_allclose(vmapped[path], alone[path], rtol=1e-5, atol=1e-6, err_msg=path)


@pytest.mark.hf_flax
def test_a_sweep_variant_that_cannot_work_fails_before_training(tiny, tmp_path, capsys):
    model, data = tiny
    args = ["sweep", *tiny_run.train_args(model, data, tmp_path / "run", "--d-initials", "0.1", "--seeds", "0",
                                          "--train-vectors", "lambda_d", "--frozen-b", "0")]
    assert main(args) == 2
    assert "sweep point lambda_d d=0.1: --d-initial 0.1, --frozen-b 0" in capsys.readouterr().err
    assert main([*args[:-2], "--adapters-per-pass", "0"]) == 2
    assert "argument --adapters-per-pass: must be a positive integer, got '0'" in capsys.readouterr().err
    assert main([*args[:-4], "--mesh", "2x1"]) == 2  # a sweep runs on one device: it takes no --mesh
    assert "unrecognized arguments: --mesh 2x1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---- the command line: every command listed, bad values refused in one line before anything loads ----

def test_help_lists_every_command_and_each_commands_flags(capsys):
    result = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=tiny_run.REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    for command in ("classify", "causal-lm", "sweep", "export", "convert-gguf", "bench", "bench-multi"):
        assert re.search(rf"^\s+{command}\b", result.stdout, flags=re.M), command
    assert {c.name for c in COMMANDS} == {"classify", "causal-lm", "sweep", "export", "convert-gguf", "bench",
                                          "bench-multi"}
    assert main(["sweep", "--help"]) == 0
    sweep_help = capsys.readouterr().out
    for flag in ("--d-initials", "--seeds", "--frozen-b", "--adapters-per-pass", "--dropout", "--path",
                 "--projection-inits", "--train-vectors", "--lr-vectors"):
        assert flag in sweep_help, flag
    for command, flag in (("classify", "--baseline"), ("causal-lm", "--max-new-tokens"), ("export", "--format"),
                          ("convert-gguf", "--max-positions"), ("bench", "--workload"), ("bench-multi", "--ks")):
        assert main([command, "--help"]) == 0
        assert flag in capsys.readouterr().out, (command, flag)


BAD_FLAGS = [
    (["--schedule", "bogus"], "argument --schedule: invalid choice: 'bogus' (choose from 'linear', 'cosine', "
                              "'constant')"),
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got '0'"),
    (["--log-every", "0"], "argument --log-every: must be a positive integer, got '0'"),
    (["--lr-vectors", "nan"], "argument --lr-vectors: must be a finite number > 0, got 'nan'"),
    (["--path", "bogus"], "argument --path: invalid choice: 'bogus' (choose from 'merged', 'activation', "
                          "'activation-lean', 'auto')"),
    (["--dropout", "1.5"], "argument --dropout: must be a number in [0, 1), got '1.5'"),
    (["--test-fraction", "0"], "argument --test-fraction: must be a number in (0, 1), got '0'"),
    (["--seed", "-1"], "argument --seed: must be an integer in [0, 2**32), got '-1'"),
    (["--mesh", "two"], "argument --mesh: must be 'auto' or DATAxFSDP"),
    (["--projection-sharing", "per-layer"], "argument --projection-sharing: invalid choice: 'per-layer'"),
    (["--backend", "linen", "--dropout", "0.3"],
     "--dropout 0.3 acts on each adapted layer's input, which --path merged never computes"),
    (["--dropout", "0.3"], "--dropout 0.3 acts on each adapted layer's input, which --path merged never computes"),
    (["--path", "auto"], "--path auto is not offered with --backend nnx; use one of merged, activation"),
    (["--train-vectors", "lambda_d"], "--b-initial 0, --train-vectors lambda_d: VeraConfig(train_vectors='lambda_d') "
                                      "freezes lambda_b at b_initial=0.0"),
    (["causal-lm", "--answers", "0"], "argument --answers: must be a positive integer, got '0'"),
    (["sweep", "--seeds", "-3"], "argument --seeds: must be an integer in [0, 2**32), got '-3'"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_a_bad_flag_value_is_one_line_before_anything_loads(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.setenv("VERA_JAX_CACHE", str(tmp_path / "cache"))  # the packaged model and data would go here
    started = time.perf_counter()
    assert main([*flags, "--output-dir", str(tmp_path / "run")]) == 2
    assert time.perf_counter() - started < 2.0
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_a_bad_flag_value_exits_2_from_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "train", "--schedule", "bogus", "--output-dir", str(tmp_path)],
                            cwd=tiny_run.REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: argument --schedule: invalid choice: 'bogus' (choose from 'linear', 'cosine', 'constant') "
        "(see python -m train classify --help)"]
