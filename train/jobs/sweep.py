"""``python -m train sweep``: K adapters on a grid of d_initial x seed, trained in one vmapped program; recipes
(learning rates, rank, epochs, schedule) and the paper's ablations as programs of their own.

Each grid point trains as ``python -m train`` trains with that point's flags: the adapter with seed s
and d_initial d starts and learns as ``python -m train --d-initial d --seed s`` (its data order,
dropout, and a head the checkpoint lacks drawn from s; every other flag the same), except that all
points share the held-out split and the projections A/B of ``--seed``, VeRA's point. One compiled
step trains a program's adapters, vmapped ``--adapters-per-pass`` at a time
(`vera_jax.map_adapters`), each with its own optimizer state; one such evaluation scores them on the
same held-out split. The program is the run's training loop and evaluation (`train.engine.loop`,
`train.engine.evaluation`) over the stacked adapters. Runs on one device, without checkpoints.

The paper's ablations (``--projection-init``, ``--projection-sharing``, ``--train-vectors``) and the recipe
(``--lr-vectors``, ``--lr-head``, ``--r``, ``--epochs``, ``--schedule``, ``--warmup-ratio``) are grid axes too, each
taking several values: each combination is a variant with its own projections, trainable-tree structure or
optimisation, trained as its own program over d_initial x seed. With ``--train-vectors lambda_b`` lambda_d is a
constant (d_initial) of the config, so each d_initial is a model of its own and trains as its own program.

Every adapter is scored on the validation rows after each epoch and on the test rows at the end; the choice
between them is made on validation accuracy alone: ``--select DIR`` writes the best adapter as a run directory
(its Orbax adapter, PEFT export and summary), as ``python -m train`` with that point's flags writes one.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import time
from pathlib import Path

import numpy as np

import vera_jax
from train.engine.errors import TrainingDiverged
from train.engine.evaluation import Evaluator
from train.engine.loop import Trainees, Validation, fit, learning_rate_flags
from train.engine.metrics import directory_bytes, write_json
from train.engine.run import (Run, check_adapter_directories, count_steps, locked_run, model_config, output_dir,
                              save_adapters, start)
from train.jobs import classify
from train.models.load import load_classifier
from train.options import (SWEEP, FlagError, Options, add_options, check_options, finite_float, from_args,
                           positive_int, seed_int)
from vera_jax import checkpoint as adapter_checkpoint
from vera_jax.host import to_host
from vera_jax.paths import flatten, unflatten

__all__ = ["add_arguments", "command", "sweep", "Grid", "Program", "point_options"]

# Fields a sweep can vary: each flag takes several values. VeraConfig's ablations, then the recipe's.
ABLATIONS = ("projection_init", "projection_sharing", "train_vectors")
RECIPE = ("lr_vectors", "lr_head", "r", "epochs", "schedule", "warmup_ratio")
VARIANT_FIELDS = (*ABLATIONS, *RECIPE)  # a program's own settings, in a variant's order
GRID_FIELDS = ("d_initial", *VARIANT_FIELDS)
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
    variants: tuple[tuple, ...]  # values of VARIANT_FIELDS
    frozen_b: float = 1.0  # the value lambda_b is held at in variants that train lambda_d only
    adapters_per_pass: int | None = None  # adapters vmapped together; None: `vera_jax.adapters_per_pass` picks
    varied: tuple[str, ...] = ()  # the RECIPE fields given several values (named in each point's label)

    def programs(self) -> list[tuple[tuple, tuple[float, ...]]]:
        """``(variant, d_initials)`` of each compiled program, in order."""
        programs = []
        for variant in self.variants:
            if _settings(variant)["train_vectors"] == "lambda_b":  # lambda_d is the constant d_initial: one model each
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
    parser.add_argument("--select", default=None, metavar="DIR",
                        help="write the adapter of the best validation accuracy as a run directory DIR (adapter, "
                             "PEFT export, summary.json)")


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
    varied = tuple(name for name in RECIPE if len(values[name]) > 1)
    grid = Grid(values["d_initial"], tuple(args.seeds),
                tuple(itertools.product(*(values[name] for name in VARIANT_FIELDS))), frozen_b, args.adapters_per_pass,
                varied)
    for variant, d_initial in itertools.product(grid.variants, grid.d_initials):
        try:
            check_options(point_options(options, grid, variant, d_initial))
        except FlagError as err:
            lambda_d = _settings(variant)["train_vectors"] == "lambda_d"
            message = str(err).replace("--b-initial", "--frozen-b") if lambda_d else str(err)
            raise FlagError(f"sweep point {_setting_name(grid, variant, d_initial)}: {message}") from None
    return point_options(options, grid, grid.variants[0], grid.d_initials[0]), grid


def command(args: argparse.Namespace) -> None:
    sweep(*parse(args), args.select)


def _settings(variant: tuple) -> dict:
    """``{field: value}`` of a variant (VARIANT_FIELDS)."""
    return dict(zip(VARIANT_FIELDS, variant))


def point_options(options: Options, grid: Grid, variant: tuple, d_initial: float) -> Options:
    """The flags of the single run a grid point trains like (its seed aside)."""
    settings = _settings(variant)
    frozen = settings["train_vectors"] == "lambda_d"
    return options.replace(d_initial=d_initial, **settings,
                           b_initial=grid.frozen_b if frozen else options.model.b_initial)


def _variant_parts(grid: Grid, variant: tuple) -> tuple[str, list[str]]:
    """The ablations that differ from VeRA's defaults ('kaiming_normal+lambda_b'; '' for none), and each recipe
    setting the grid varies (['lr_vectors=0.02'])."""
    defaults = {field.name: field.default for field in dataclasses.fields(vera_jax.VeraConfig)}
    settings = _settings(variant)
    ablations = "+".join(settings[name] for name in ABLATIONS if settings[name] != defaults[name])
    return ablations, [f"{name}={settings[name]:g}" if isinstance(settings[name], float) else
                       f"{name}={settings[name]}" for name in grid.varied]


def _setting_name(grid: Grid, variant: tuple, d_initial: float) -> str:
    """One point of the grid but for the seed, e.g. 'kaiming_normal d=0.1', 'vera lr_vectors=0.02 d=0.1'."""
    ablations, recipe = _variant_parts(grid, variant)
    return " ".join([ablations or "vera", *recipe, f"d={d_initial:g}"])


def _run_name(grid: Grid, variant: tuple, d_initial: float, seed: int) -> str:
    return f"{_setting_name(grid, variant, d_initial)} seed={seed}"


def _adapter_name(grid: Grid, variant: tuple, d_initial: float, seed: int) -> str:
    """e.g. 'kaiming_normal-d0.1-seed0', 'lr_vectors0.02-d0.1-seed1'."""
    ablations, recipe = _variant_parts(grid, variant)
    return "-".join([*([ablations] if ablations else []), *(part.replace("=", "") for part in recipe),
                     f"d{d_initial:g}", f"seed{seed}"])


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


@dataclasses.dataclass(frozen=True)
class Program:
    """What one program trained: each adapter (with its own point's config; None where it diverged), the program's
    initial adapter, and per adapter its validation and test accuracy (NaN where diverged or without validation
    rows) and the step at which it diverged (None: it did not)."""

    adapters: list[vera_jax.Adapter | None]
    base: vera_jax.Adapter
    validation_accuracy: np.ndarray
    test_accuracy: np.ndarray
    diverged_at: list[int | None]
    steps: int


def _train_program(setup: Run, grid: Grid, variant: tuple, d_initials: tuple[float, ...],
                   heads: dict[int, dict]) -> Program:
    """Train one adapter per (d_initial, seed) of one program, stacked, in the run's training loop, validated after
    every epoch; score each on the validation and test rows."""
    model, params = setup.model, setup.params
    options = point_options(setup.options, grid, variant, d_initials[0])
    steps_per_epoch, total_steps = count_steps(options.optim, len(setup.job.train_data))
    ctx = dataclasses.replace(setup.ctx, options=options, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    points = list(itertools.product(d_initials, grid.seeds))
    configs = [model_config(point_options(options, grid, variant, d), model) for d, _ in points]
    # One config, one A/B for the program; each point's initial trainable tree from its own config.
    base = vera_jax.init_adapter(params, configs[0])
    stacked = vera_jax.stack([
        base.replace(trainable=unflatten(flatten(vera_jax.vectors.init_trainable(params, config)) | heads[seed]))
        for config, (_, seed) in zip(configs, points)])
    trainees = Trainees(tuple(_run_name(grid, variant, d, seed) for d, seed in points), tuple(s for _, s in points),
                        grid.adapters_per_pass)
    logits_fn = model.vera_logits(setup.path, base.config)
    scorer = Evaluator(ctx, logits_fn, trainees)
    validation = None if ctx.validation_data is None else Validation(
        lambda adapter: scorer(adapter, ctx.validation_data))
    missing = np.full(len(points), np.nan)
    try:
        trained = fit(ctx, trainees, stacked, logits_fn, setup.log, validation=validation)
    except TrainingDiverged as err:
        return Program([None] * len(points), base, missing, missing, list(err.diverged_at), total_steps)
    accuracy, _ = scorer(trained.adapter, ctx.test_data)
    adapters = [adapter.replace(config=config)
                for adapter, config in zip(vera_jax.unstack(to_host(trained.adapter)), configs)]
    validated = missing if trained.validation_accuracy is None else np.asarray(trained.validation_accuracy)
    return Program(adapters, base, validated, accuracy, list(trained.diverged_at), total_steps)


@locked_run
def sweep(options: Options, grid: Grid, select: str | None = None) -> dict:
    """Train the grid, write sweep.json, sweep.png and each adapter; with ``select``, the best adapter by
    validation accuracy as a run directory there."""
    started = time.perf_counter()
    choosing = None
    if select is not None:
        check_adapter_directories(Path(select), "--select")
        choosing = "--select"  # needs validation rows, checked with the splits before the model loads
    setup = start(options, functools.partial(classify.prepare, choosing=choosing), on_mesh=False)
    out, params = setup.out, setup.params
    heads = _heads_for_seeds(options, setup.model, vera_jax.vectors.full_leaves(setup.adapter.trainable), grid.seeds)
    rows, adapters = [], {}
    for variant, d_initials in grid.programs():
        program = _train_program(setup, grid, variant, d_initials, heads)
        trainable_params = vera_jax.count_parameters(params, program.base)[0]
        points = itertools.product(d_initials, grid.seeds)
        for (d, seed), adapter, validated, tested, diverged_at in zip(
                points, program.adapters, program.validation_accuracy, program.test_accuracy, program.diverged_at):
            # A diverged adapter has no accuracy and is not saved.
            name = _adapter_name(grid, variant, d, seed)
            rows.append({**_settings(variant), "d_initial": d, "seed": seed, "adapter": name,
                         "validation_accuracy": None if diverged_at or np.isnan(validated) else float(validated),
                         "test_accuracy": None if diverged_at else float(tested), "diverged_at_step": diverged_at,
                         "trainable_params": trainable_params, "steps": program.steps})
            if not diverged_at:
                setup.log.write(run=_run_name(grid, variant, d, seed), step=program.steps, test_accuracy=float(tested))
                adapter_checkpoint.save(out / "adapters" / name, adapter, params)
                adapters[name] = adapter
    if all(row["diverged_at_step"] for row in rows):
        raise TrainingDiverged(f"Every adapter of the sweep diverged (the first at step "
                               f"{min(row['diverged_at_step'] for row in rows)}). Lower the learning rate "
                               f"({learning_rate_flags(options)}) or the --d-initials, and sweep in a new "
                               "--output-dir.")
    groups, validated = {}, {}
    for row in rows:
        label = _setting_name(grid, tuple(row[name] for name in VARIANT_FIELDS), row["d_initial"])
        groups.setdefault(label, []).append(row["test_accuracy"])
        validated.setdefault(label, []).append(row["validation_accuracy"])
    summary = {"grid": rows, "mean_accuracy": {label: _mean(v) for label, v in groups.items()},
               "mean_validation_accuracy": {label: _mean(v) for label, v in validated.items()},
               "mean_accuracy_by_d_initial": {f"{d:g}": _mean([r["test_accuracy"] for r in rows
                                                               if r["d_initial"] == d])
                                              for d in grid.d_initials},
               "adapters": len(rows), "steps": setup.total_steps, "path_detail": setup.path_detail,
               "wall_seconds": time.perf_counter() - started,
               "options": options.flat()}
    if select is not None:
        summary["selected"] = _select(setup, grid, rows, adapters, Path(select))
    write_json(out / "sweep.json", summary)
    _plot(summary["mean_accuracy"], groups, setup.log.records(), out / "sweep.png")
    header = [*ABLATIONS, *grid.varied, "d_initial", "seed", "trainable", "validation", "test accuracy"]
    print("  ".join(f"{h:>18}" for h in header))
    for row in rows:
        accuracy = (f"diverged at {row['diverged_at_step']}" if row["diverged_at_step"]
                    else f"{row['test_accuracy']:.4f}")
        validation = "-" if row["validation_accuracy"] is None else f"{row['validation_accuracy']:.4f}"
        print("  ".join(f"{v:>18}" for v in (*(row[a] for a in (*ABLATIONS, *grid.varied)), f"{row['d_initial']:g}",
                                              row["seed"], f"{row['trainable_params']:,d}", validation, accuracy)))
    for label, mean in summary["mean_accuracy"].items():
        finite = sum(acc is not None for acc in groups[label])
        check = summary["mean_validation_accuracy"][label]
        print(f"{label}: " + (f"mean accuracy {mean:.4f} over {finite} of {len(grid.seeds)} seeds"
                              + (f" (validation {check:.4f})" if check is not None else "") if finite
                              else "every seed diverged"))
    if select is not None:
        chosen = summary["selected"]
        print(f"selected {chosen['adapter']} (validation accuracy {chosen['validation_accuracy']:.4f}, test "
              f"{chosen['test_accuracy']:.4f}): run directory {select}")
    return summary


def _select(setup: Run, grid: Grid, rows: list[dict], adapters: dict, directory: Path) -> dict:
    """Write the adapter of the best validation accuracy (the first of equals) to ``directory`` as a run writes its
    own: ``adapter/``, ``peft_adapter/`` and ``summary.json`` with the point's flags. Returns its grid row."""
    scored = [row for row in rows if row["validation_accuracy"] is not None]
    best = max(scored, key=lambda row: row["validation_accuracy"])
    options = point_options(setup.options, grid, tuple(best[name] for name in VARIANT_FIELDS),
                            best["d_initial"]).replace(seed=best["seed"], output_dir=str(directory))
    run = dataclasses.replace(setup, options=options, out=output_dir(str(directory)))
    adapter_dir = save_adapters(run, adapters[best["adapter"]], "SEQ_CLS")
    write_json(directory / "summary.json", {
        **{key: best[key] for key in ("validation_accuracy", "test_accuracy", "trainable_params", "steps")},
        "model": options.model.name, "backend": options.model.backend, "dataset": options.data.dataset,
        "selected_from": {"sweep": str(setup.out), "adapter": best["adapter"], "adapters": len(rows)},
        "options": options.flat(), "adapter_bytes": directory_bytes(adapter_dir)})
    return best


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
