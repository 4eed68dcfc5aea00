"""``python -m train [flags]``: the main job; ``causal-lm ...``: instruction tuning of a causal LM;
``export ...``: adapter export; ``convert-gguf ...``: a llama.cpp GGUF to a Hugging Face directory;
``sweep ...``: K adapters in one vmapped run; ``bench ...`` and ``bench-multi ...``: benchmarks."""

import sys

from train import bench, bench_multi, causal_lm, gguf_llama, sweep
from train.checkpoints import CheckpointMismatch
from train.classify import RunError, run
from train.data import DataError
from train.export import ExportError, export, parse_args
from train.mesh import MeshError
from train.model import ModelError
from train.options import parse_options
from vera_jax.peft import AdapterFileError

USER_ERRORS = (RunError, DataError, MeshError, ModelError, CheckpointMismatch, ExportError, AdapterFileError,
               gguf_llama.GGUFError)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["causal-lm"]:
            causal_lm.run(causal_lm.parse_args(argv[1:]))
        elif argv[:1] == ["convert-gguf"]:
            print(f"wrote {gguf_llama.main(argv[1:])}")
        elif argv[:1] == ["export"]:
            print(f"wrote {export(parse_args(argv[1:]))}")
        elif argv[:1] == ["bench"]:
            bench.bench(bench.parse_args(argv[1:]))
        elif argv[:1] == ["bench-multi"]:
            bench_multi.bench_multi(bench_multi.parse_args(argv[1:]))
        elif argv[:1] == ["sweep"]:
            sweep.sweep(*sweep.parse_args(argv[1:]))
        else:
            run(parse_options(argv))
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
