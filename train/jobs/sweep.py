"""``python -m train sweep``: K adapters on a grid of d_initial x seed, trained in one vmapped program.

Each grid point trains as ``python -m train`` trains with that point's flags: the adapter with seed s
and d_initial d starts and learns as ``python -m train --d-initial d --seed s`` (its data order,
dropout, and a head the checkpoint lacks drawn from s; every other flag the same), except that all
points share the held-out split and the projections A/B of ``--seed``, VeRA's point. One compiled
step trains a program's adapters, vmapped ``--adapters-per-pass`` at a time
(`vera_jax.map_adapters`), each with its own optimizer state; one such evaluation scores them on the
same held-out split. The program is the run's training loop and evaluation (`train.engine.loop`,
`train.engine.evaluation`) over the stacked adapters. Runs on one device, without checkpoints.

The paper's ablations are grid axes too (``--projection-init``, ``--projection-sharing``,
``--train-vectors``, each taking several values): each combination is a variant with its own
projections or trainable-tree structure, trained as its own program over d_initial x seed. With
``--train-vectors lambda_b`` lambda_d is a constant (d_initial) of the config, so each d_initial is
a model of its own and trains as its own program.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from pathlib import Path

import numpy as np

import vera_jax
from train.engine.errors import TrainingDiverged
from train.engine.evaluation import evaluate
from train.engine.loop import Trainees, fit, learning_rate_flags
from train.engine.metrics import write_json
from train.engine.run import Run, locked_run, model_config, start
from train.jobs import classify
from train.models.load import load_classifier
from train.options import (SWEEP, FlagError, Options, add_options, check_options, finite_float, from_args,
                           positive_int, seed_int)
from vera_jax import checkpoint as adapter_checkpoint
from vera_jax.host import to_host
from vera_jax.paths import flatten, unflatten

__all__ = ["add_arguments", "command", "sweep", "Grid", "point_options"]

# VeraConfig fields a sweep can vary: each flag takes several values.
ABLATIONS = ("projection_init", "projection_sharing", "train_vectors")
GRID_FIELDS = ("d_initial", *ABLATIONS)
DEFAULT_D_INITIALS = (1e-7, 0.1, 1.0)


@dataclasses.dataclass(frozen=True)
class Grid:
    """The sweep: every combination of an ablation variant, a d_initial and a seed is one adapter.

    Adapters of one program (one variant; with lambda_b alone trained, one variant and one d_initial)
    share projections, trainable-tree structure and config, and train in one vmapped program;
    programs run one after another.
    """

    d_initials: tuple[float, ...]
    seeds: tuple[int, ...]
    variants: tuple[tuple[str, str, str], ...]  # (projection_init, projection_sharing, train_vectors)
    frozen_b: float = 1.0  # the value lambda_b is held at in variants that train lambda_d only
    adapters_per_pass: int | None = None  # adapters vmapped together; None: `vera_jax.adapters_per_pass` picks

    def programs(self) -> list[tuple[tuple[str, str, str], tuple[float, ...]]]:
        """``(variant, d_initials)`` of each compiled program, in order."""
        programs = []
        for variant in self.variants:
            if variant[2] == "lambda_b":  # lambda_d is the constant d_initial: each value is another model
                programs += [(variant, (d,)) for d in self.d_initials]
            else:
                programs.append((variant, self.d_initials))
        return programs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, SWEEP, several=GRID_FIELDS)
    parser.set_defaults(d_initial=list(DEFAULT_D_INITIALS))
    parser.add_argument("--seeds", type=seed_int, nargs="+", default=[0, 1],
                        help="one adapter per seed: its data order, dropout and (when the checkpoint lacks one) head")
    parser.add_argument("--frozen-b", type=finite_float, default=None,
                        help="where lambda_b is held when --train-vectors lambda_d (default: --b-initial when "
                             "non-zero, else 1.0)")
    parser.add_argument("--adapters-per-pass", type=positive_int, default=None,
                        help="adapters vmapped together (default: chosen for the device by "
                             "vera_jax.adapters_per_pass)")


def parse(args: argparse.Namespace) -> tuple[Options, Grid]:
    """The shared options (the grid axes at their first value) and the grid, every point's config checked.

    Raises:
      FlagError: a point whose flags do not fit together.
    """
    values = {name: tuple(getattr(args, name)) for name in GRID_FIELDS}
    for name in GRID_FIELDS:
        setattr(args, name, values[name][0])
    options = from_args(args, check=False)
    frozen_b = args.frozen_b if args.frozen_b is not None else (options.model.b_initial or 1.0)
    grid = Grid(values["d_initial"], tuple(args.seeds), tuple(itertools.product(*(values[a] for a in ABLATIONS))),
                frozen_b, args.adapters_per_pass)
    for variant, d_initial in itertools.product(grid.variants, grid.d_initials):
        try:
            check_options(point_options(options, grid, variant, d_initial))
        except FlagError as err:
            message = str(err).replace("--b-initial", "--frozen-b") if variant[2] == "lambda_d" else str(err)
            raise FlagError(f"sweep point {_setting_name(variant, d_initial)}: {message}") from None
    return point_options(options, grid, grid.variants[0], grid.d_initials[0]), grid


def command(args: argparse.Namespace) -> None:
    sweep(*parse(args))


def point_options(options: Options, grid: Grid, variant: tuple[str, str, str], d_initial: float) -> Options:
    """The flags of the single run a grid point trains like (its seed aside)."""
    projection_init, projection_sharing, train_vectors = variant
    return options.replace(d_initial=d_initial, projection_init=projection_init, projection_sharing=projection_sharing,
                           train_vectors=train_vectors,
                           b_initial=grid.frozen_b if train_vectors == "lambda_d" else options.model.b_initial)


def _variant_label(variant: tuple[str, str, str]) -> str:
    """The settings that differ from VeRA's defaults, e.g. 'kaiming_normal+lambda_b'; '' for plain VeRA."""
    defaults = {field.name: field.default for field in dataclasses.fields(vera_jax.VeraConfig)}
    return "+".join(value for value, name in zip(variant, ABLATIONS) if value != defaults[name])


def _setting_name(variant: tuple[str, str, str], d_initial: float) -> str:
    """One point of the grid but for the seed, e.g. 'kaiming_normal d=0.1'."""
    return f"{_variant_label(variant) or 'vera'} d={d_initial:g}"


def _run_name(variant: tuple[str, str, str], d_initial: float, seed: int) -> str:
    return f"{_setting_name(variant, d_initial)} seed={seed}"


def _adapter_name(variant: tuple[str, str, str], d_initial: float, seed: int) -> str:
    label = _variant_label(variant)
    return f"{label + '-' if label else ''}d{d_initial:g}-seed{seed}"


def _heads_for_seeds(options: Options, model, head: dict, seeds: tuple[int, ...]) -> dict[int, dict]:
    """Each seed's initial head (the leaves trained in full, flat by path): the one ``--seed s`` would load.

    A leaf the checkpoint holds is loaded whatever the seed; a leaf it lacks (a new head) is transformers'
    draw from the seed. The leaves that differ when the model is loaded with another seed are the new ones.
    """
    others = sorted(set(seeds) - {options.run.seed})
    if not head or not others:
        return {seed: head for seed in seeds}
    reloaded = flatten(load_classifier(options.model.name, model.config.num_labels, seed=others[0],
                                       backend=options.model.backend)[0].params)
    new = {path for path, leaf in head.items() if not np.array_equal(np.asarray(reloaded[path]), np.asarray(leaf))}
    if not new:
        return {seed: head for seed in seeds}
    heads = {options.run.seed: head}
    for seed in others:
        drawn = flatten(model.initial_params(seed))
        heads[seed] = {path: drawn[path] if path in new else leaf for path, leaf in head.items()}
    return heads


def _train_program(setup: Run, grid: Grid, variant: tuple[str, str, str], d_initials: tuple[float, ...],
                   heads: dict[int, dict]) -> tuple[list[vera_jax.Adapter], vera_jax.Adapter, np.ndarray, list]:
    """Train one adapter per (d_initial, seed) of one program, stacked, in the run's training loop.

    Returns each adapter (with its own point's config), the program's initial adapter, the held-out
    accuracies (K,), and for each adapter the step at which it diverged (a logged loss or its trained
    vectors not finite), or None.
    """
    options, model, params = setup.options, setup.model, setup.params
    points = list(itertools.product(d_initials, grid.seeds))
    configs = [model_config(point_options(options, grid, variant, d), model) for d, _ in points]
    # One config, one A/B for the program; each point's initial trainable tree from its own config.
    base = vera_jax.init_adapter(params, configs[0])
    stacked = vera_jax.stack([
        base.replace(trainable=unflatten(flatten(vera_jax.vectors.init_trainable(params, config)) | heads[seed]))
        for config, (_, seed) in zip(configs, points)])
    trainees = Trainees(tuple(_run_name(variant, d, seed) for d, seed in points), tuple(s for _, s in points),
                        grid.adapters_per_pass)
    logits_fn = setup.logits()
    try:
        trained = fit(setup.ctx, trainees, stacked, logits_fn, setup.log)
    except TrainingDiverged as err:
        return [None] * len(points), base, np.full(len(points), np.nan), list(err.diverged_at)
    accuracy, _ = evaluate(setup.ctx, trained.adapter, logits_fn, trainees)
    adapters = [adapter.replace(config=config)
                for adapter, config in zip(vera_jax.unstack(to_host(trained.adapter)), configs)]
    return adapters, base, accuracy, list(trained.diverged_at)


@locked_run
def sweep(options: Options, grid: Grid) -> dict:
    started = time.perf_counter()
    setup = start(options, classify.prepare, on_mesh=False)
    out, params = setup.out, setup.params
    heads = _heads_for_seeds(options, setup.model, vera_jax.vectors.full_leaves(setup.adapter.trainable), grid.seeds)
    rows = []
    for variant, d_initials in grid.programs():
        adapters, base, accuracy, diverged = _train_program(setup, grid, variant, d_initials, heads)
        trainable_params = vera_jax.count_parameters(params, base)[0]
        points = itertools.product(d_initials, grid.seeds)
        for (d, seed), adapter, acc, diverged_at in zip(points, adapters, accuracy, diverged):
            # A diverged adapter has no accuracy and is not saved.
            rows.append({**dict(zip(ABLATIONS, variant)), "d_initial": d, "seed": seed,
                         "test_accuracy": None if diverged_at else float(acc), "diverged_at_step": diverged_at,
                         "trainable_params": trainable_params})
            if not diverged_at:
                setup.log.write(run=_run_name(variant, d, seed), step=setup.total_steps, test_accuracy=float(acc))
                adapter_checkpoint.save(out / "adapters" / _adapter_name(variant, d, seed), adapter, params)
    if all(row["diverged_at_step"] for row in rows):
        raise TrainingDiverged(f"Every adapter of the sweep diverged (the first at step "
                               f"{min(row['diverged_at_step'] for row in rows)}). Lower the learning rate "
                               f"({learning_rate_flags(options)}) or the --d-initials, and sweep in a new "
                               "--output-dir.")
    groups = {}
    for row in rows:
        groups.setdefault(_setting_name(tuple(row[a] for a in ABLATIONS), row["d_initial"]), []).append(
            row["test_accuracy"])
    summary = {"grid": rows, "mean_accuracy": {label: _mean(v) for label, v in groups.items()},
               "mean_accuracy_by_d_initial": {f"{d:g}": _mean([r["test_accuracy"] for r in rows
                                                               if r["d_initial"] == d])
                                              for d in grid.d_initials},
               "adapters": len(rows), "steps": setup.total_steps, "path_detail": setup.path_detail,
               "wall_seconds": time.perf_counter() - started,
               "options": options.flat()}
    write_json(out / "sweep.json", summary)
    _plot(summary["mean_accuracy"], groups, setup.log.records(), out / "sweep.png")
    header = [*ABLATIONS, "d_initial", "seed", "trainable", "test accuracy"]
    print("  ".join(f"{h:>18}" for h in header))
    for row in rows:
        accuracy = (f"diverged at {row['diverged_at_step']}" if row["diverged_at_step"]
                    else f"{row['test_accuracy']:.4f}")
        print("  ".join(f"{v:>18}" for v in (*(row[a] for a in ABLATIONS), f"{row['d_initial']:g}", row["seed"],
                                              f"{row['trainable_params']:,d}", accuracy)))
    for label, mean in summary["mean_accuracy"].items():
        finite = sum(acc is not None for acc in groups[label])
        print(f"{label}: " + (f"mean accuracy {mean:.4f} over {finite} of {len(grid.seeds)} seeds" if finite
                              else "every seed diverged"))
    return summary


def _mean(accuracies: list[float | None]) -> float | None:
    """The mean over the adapters that did not diverge (None where all did)."""
    finite = [acc for acc in accuracies if acc is not None]
    return float(np.mean(finite)) if finite else None


def _plot(means: dict[str, float], groups: dict[str, list[float]], records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for run in sorted({r["run"] for r in records if "loss" in r}):
        points = [r for r in records if r["run"] == run and "loss" in r]
        left.plot([r["step"] for r in points], [r["loss"] for r in points], label=run, alpha=0.8)
    left.set(xlabel="step", ylabel="training loss", title="training loss per adapter")
    left.legend(fontsize=6)
    for i, (label, accuracies) in enumerate(groups.items()):
        finite = [acc for acc in accuracies if acc is not None]
        right.scatter([i] * len(finite), finite)
        right.bar(i, means[label] or 0.0, alpha=0.3)
    right.set_xticks(range(len(groups)), list(groups), rotation=30, ha="right", fontsize=7)
    right.set(ylabel="held-out accuracy", title="accuracy per setting (dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
