"""``torchrun --nproc-per-node N -m spinediff.run.train ARGS``: ``spinediff train`` on every rank, data-parallel.

ARGS are exactly those of ``spinediff train`` (the same parser); ``spinediff train ... --distributed`` started
by torchrun does the same. See ``documentation/distributed.md``.
"""

from __future__ import annotations

import sys

from spinediff.errors import SpineDiffError
from spinediff.training.train_command import build_parser, run_train


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.distributed = True
    try:
        return run_train(args)
    except SpineDiffError as exc:
        print(f"spinediff.run.train: error: {exc}", file=sys.stderr)
        return SpineDiffError.exit_code


if __name__ == "__main__":
    sys.exit(main())
