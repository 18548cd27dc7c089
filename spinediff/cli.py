"""The ``spinediff`` command: one thin argparse wrapper per subcommand.

Each subcommand lives in its package as a module exposing ``add_parser(subparsers)``; the
parser's ``func`` default receives the parsed arguments and calls a typed API function that
works from Python too. User-caused errors (``SpineDiffError``) are printed without a traceback
and give exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from spinediff.errors import SpineDiffError
from spinediff.version import __version__

# (module providing add_parser). Order = order in --help.
SUBCOMMAND_MODULES: list[str] = [
    "spinediff.experiments.demo",
    "spinediff.datasets.phantom_command",
    "spinediff.datasets.validate_command",
    "spinediff.datasets.convert_command",
    "spinediff.training.train_command",
    "spinediff.training.distill_command",
    "spinediff.inference.predict_command",
    "spinediff.inference.ensemble_command",
    "spinediff.inference.find_best_command",
    "spinediff.experiments.sampling",
    "spinediff.inference.postprocess_command",
    "spinediff.evaluation.evaluate_command",
    "spinediff.experiments.benchmark_command",
    "spinediff.evaluation.report_command",
    "spinediff.registration.register_command",
    "spinediff.planning.plan_command",
]


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: a refused option prints one line that names the option and what it needs (the
    ``type=`` functions of :mod:`spinediff.utilities.argtypes`), and where the options are listed, then exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}. See `{self.prog} --help`.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spinediff",
        description=(
            "Self-configuring diffusion models for spine imaging, in nnU-Net's workflow: "
            "MRI->CT translation, diffusion segmentation with uncertainty, segmentation-guided "
            "generation, and baselines. Folders default to nnU-Net's variables nnUNet_raw, "
            "nnUNet_preprocessed and nnUNet_results."
        ),
    )
    parser.add_argument("--version", action="version", version=f"spinediff {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        result = args.func(args)
    except SpineDiffError as exc:
        print(f"spinediff {args.command}: error: {exc}", file=sys.stderr)
        return SpineDiffError.exit_code
    except KeyboardInterrupt:
        print(f"spinediff {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
