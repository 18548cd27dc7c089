"""The ``--device`` option, parsed once: every command gets a ``torch.device`` from argparse and passes it on."""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING

from spinediff.errors import SpineDiffError

if TYPE_CHECKING:
    import torch

DEVICE_HELP = "auto (a GPU when torch sees one, else the CPU), cpu, cuda or cuda:N"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def parse_device(value: str | torch.device, *, must_be_present: bool = False) -> torch.device:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; ``cpu``, ``cuda`` and ``cuda:N`` as written.

    With ``must_be_present`` a CUDA device must be one that torch sees (:func:`check_present`); without it
    (``spinediff plan``) plans for a GPU can be made on a machine without one.
    """
    import torch  # here, so that a command's --help does not wait for torch

    if isinstance(value, torch.device):
        device = value
    else:
        text = str(value).strip().lower()
        if not _DEVICE.match(text):
            raise SpineDiffError(f"--device must be {DEVICE_HELP}; got {value!r}.")
        if text == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(text)
    if must_be_present:
        check_present(device)
    return device


def check_present(device: torch.device) -> None:
    """Refuse a CUDA device that torch does not see, before any work."""
    import torch

    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise SpineDiffError("no CUDA device is visible to torch (torch.cuda.is_available() is False); use "
                             "--device cpu (or auto, which takes a GPU when there is one)")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise SpineDiffError(f"{device} does not exist: torch sees {count} CUDA device(s), cuda:0 to "
                             f"cuda:{count - 1}; use one of them or --device cuda")


def _argparse_device(value: str) -> torch.device:
    try:
        return parse_device(value, must_be_present=True)
    except SpineDiffError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _argparse_planned_device(value: str) -> torch.device:
    try:
        return parse_device(value)
    except SpineDiffError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_device_argument(parser: argparse.ArgumentParser, purpose: str = "", *, must_be_present: bool = True) -> None:
    """``--device`` with the same meaning and default (``auto``) in every command. A command that runs on the
    device refuses, while parsing, a CUDA device that torch does not see; ``must_be_present=False`` is for
    ``spinediff plan``, which can plan for a GPU that this machine does not have."""
    parser.add_argument("--device", type=_argparse_device if must_be_present else _argparse_planned_device,
                        default="auto", help=f"{purpose + ': ' if purpose else ''}{DEVICE_HELP}")


#: The network's precision (``--precision``): see :mod:`spinediff.utilities.precision`.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """``--precision``: the same values and meaning in ``train`` and ``predict``
    (:mod:`spinediff.utilities.precision`)."""
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="network precision: auto (default) = bfloat16 autocast on GPUs that support it, else "
                             "float16 with a gradient scaler, float32 on the CPU; fp32 turns mixed precision off; "
                             "bf16/fp16 force that type (also on the CPU)")
