"""``torchrun --nproc-per-node N -m spinediff.run.train ARGS``: ``spinediff train`` on every rank, data-parallel.

ARGS are exactly those of ``spinediff train`` (the parser is the same object);
``spinediff train ... --distributed`` started by torchrun does the same. See
``documentation/distributed.md``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from spinediff.errors import SpineDiffError
from spinediff.training import train_command
from spinediff.training.distributed import TORCHRUN_VARIABLES, LaunchEnvironment, process_group

PROG = "torchrun --nproc-per-node N -m spinediff.run.train"


def build_parser() -> argparse.ArgumentParser:
    """``spinediff train``'s own parser (built by ``train_command.add_parser``), under this entry's name."""
    subparsers = argparse.ArgumentParser(add_help=False).add_subparsers()
    train_command.add_parser(subparsers)
    parser = subparsers.choices["train"]
    parser.prog = PROG
    return parser


def torchrun_arguments(args: argparse.Namespace) -> list[str]:
    """The command-line arguments that reproduce ``args`` (defaults and ``--distributed`` left out)."""
    tokens: list[str] = []
    for action in build_parser()._actions:
        if not action.option_strings or action.dest in ("help", "distributed"):
            continue
        value = getattr(args, action.dest, action.default)
        if value is None or value == action.default:
            continue
        option = max(action.option_strings, key=len)
        tokens += [option] if action.nargs == 0 else [option, str(value)]  # nargs 0: a store_true flag
    return tokens


def launch_command(args: argparse.Namespace, processes: str) -> str:
    return f"torchrun --nproc-per-node {processes} -m spinediff.run.train {shlex.join(torchrun_arguments(args))}"


@contextmanager
def distributed_session(args: argparse.Namespace) -> Iterator[None]:
    """Join the torchrun job for the duration of one training (or explain how to launch one)."""
    from spinediff.training import TRAINERS

    if args.trainer not in TRAINERS:
        raise SpineDiffError(f"Distributed training supports the spinediff trainers ({', '.join(TRAINERS)}), not "
                             f"{args.trainer!r}. nnU-Net's own trainers have their own multi-GPU mode: "
                             f"nnUNetv2_train {args.dataset} {args.configuration} {args.fold} -tr {args.trainer} "
                             "-num_gpus N (CUDA only).")
    if LaunchEnvironment.read() is None:
        missing = ", ".join(name for name in TORCHRUN_VARIABLES if name not in os.environ)
        processes = "NUM_GPUS" if str(args.device).startswith("cuda") else "2"
        raise SpineDiffError(
            "Distributed training (--distributed, spinediff.run.train) runs in processes started by torchrun; "
            f"torchrun's environment variables are missing ({missing}). Launch it with:\n"
            f"  {launch_command(args, processes)}\n"
            "(one process per GPU with --device cuda; on CPU each process trains on its share of the cores). "
            "Several machines: add --nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:29400 --rdzv-id JOB on "
            "every machine; see documentation/distributed.md.")
    with process_group(args.device):
        yield


def run_distributed(args: argparse.Namespace) -> int:
    """``spinediff train`` (``train_command.run_train``) on this rank, inside the process group."""
    with distributed_session(args):
        return train_command.run_train(argparse.Namespace(**{**vars(args), "distributed": False}))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_distributed(args)
    except SpineDiffError as exc:
        print(f"spinediff.run.train: error: {exc}", file=sys.stderr)
        return SpineDiffError.exit_code


if __name__ == "__main__":
    sys.exit(main())
