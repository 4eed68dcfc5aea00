"""``python -m train [COMMAND] [flags]``: the command line of every job; ``--help`` lists the commands.

Without a command (``python -m train --epochs 1``, or plain ``python -m train``) the main job,
``classify``, runs. ``python -m train COMMAND --help`` shows a command's flags. A bad flag value, and
anything else that stops a job before it trains (a missing column, a model without the needed class,
a mesh that does not fit), is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from types import ModuleType

from train import bench_flags
from train.engine import compile_cache
from train.engine.checkpoints import CheckpointMismatch
from train.engine.data import DataError
from train.engine.mesh import MeshError
from train.engine.run_lock import RunDirectoryBusy
from train.engine.errors import RunError
from train.jobs import causal_lm, classify, export, sweep
from train.models import gguf_llama
from train.models.load import ModelError
from train.options import FlagError, Parser
from vera_jax import AdapterFileError
from vera_jax.atomic import WriteError

__all__ = ["main", "build_parser", "COMMANDS", "DEFAULT_COMMAND"]

USER_ERRORS = (FlagError, RunError, DataError, MeshError, ModelError, CheckpointMismatch, export.ExportError,
               AdapterFileError, gguf_llama.GGUFError, bench_flags.BenchError, WriteError, RunDirectoryBusy)


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: its description, the function that adds its flags and the one that runs it."""

    name: str
    help: str  # one line in ``python -m train --help``
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]

    @classmethod
    def of(cls, name: str, help: str, module: ModuleType) -> Command:
        """A command whose module holds ``add_arguments(parser)``, ``command(args)`` and, as its docstring, the
        description."""
        return cls(name, help, module.__doc__, module.add_arguments, module.command)


def _bench(args: argparse.Namespace) -> None:
    from train.bench import step  # the benchmarks load only when asked for

    step.command(args)


def _bench_multi(args: argparse.Namespace) -> None:
    from train.bench import multi

    multi.command(args)


COMMANDS = (
    Command.of("classify", "fine-tune a Flax sequence classifier with VeRA: the main job, run when no command is given",
               classify),
    Command.of("causal-lm", "instruction-tune a Flax causal LM with VeRA on every linear layer (SmolLM2 by default)",
               causal_lm),
    Command.of("sweep", "train K adapters on a grid of d_initial x seed (and ablations) in one vmapped program", sweep),
    Command.of("export", "write an adapter as a PEFT adapter or as a merged Flax / safetensors model", export),
    Command.of("convert-gguf", "convert a llama.cpp GGUF Llama file into a Hugging Face directory", gguf_llama),
    Command("bench", "time one training step on each VeRA path, the floor and PEFT in PyTorch",
            bench_flags.BENCH, bench_flags.add_bench_arguments, _bench),
    Command("bench-multi", "time K adapters trained in one program, and N adapters mixed in one batch",
            bench_flags.BENCH_MULTI, bench_flags.add_multi_arguments, _bench_multi),
)
DEFAULT_COMMAND = "classify"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m train", description="Fine-tune Hugging Face Flax models with VeRA.",
                    epilog=f"Without a command, the flags go to '{DEFAULT_COMMAND}'. "
                           "'python -m train COMMAND --help' shows a command's flags.")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.help, description=command.description,
                                  formatter_class=_HelpFormatter)
        command.add_arguments(sub)
        sub.add_argument("--no-compile-cache", action="store_true",
                         help="compile every program afresh instead of reusing JAX's persistent compilation cache "
                              f"(in ~/.cache/vera_jax/xla, or ${compile_cache.ENV})")
        sub.set_defaults(run=command.run)
    return parser


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help (unless the help says it); the command's description as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if (action.default is None or action.default is False or action.default is argparse.SUPPRESS
                or "(default" in help or not action.option_strings):
            return help
        default = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
        return f"{help} (default: {default})".replace("%", "%%")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = [DEFAULT_COMMAND, *argv]  # flags without a command are the main job's
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help, or a bad flag (one line already on stderr)
        return exit.code if isinstance(exit.code, int) else 0
    if not args.no_compile_cache:
        compile_cache.enable()
    try:
        args.run(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
