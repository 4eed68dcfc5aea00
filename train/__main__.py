"""``python -m train [flags]``: the main job (see ``python -m train --help``)."""

import sys

from train.checkpoints import CheckpointMismatch
from train.classify import RunError, run
from train.data import DataError
from train.mesh import MeshError
from train.model import ModelError
from train.options import parse_options

USER_ERRORS = (RunError, DataError, MeshError, ModelError, CheckpointMismatch)


def main(argv=None) -> int:
    options = parse_options(argv)
    try:
        run(options)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
