"""Mixed precision for the spinediff trainers and the sampler: which autocast type a device gets, and a
network call under it whose outputs come back in float32.

``--precision`` (``TrainingOptions.precision``, ``spinediff predict --precision``):

- ``auto`` (default): on CUDA bfloat16 where the GPU supports it, else float16 with a gradient scaler; on the
  CPU float32 (bfloat16 autocast runs there and is tested, but a 2-core CPU gains nothing from it:
  ``benchmarks/gpu_check.py`` measures the ratio);
- ``fp32``: no autocast; ``bf16``/``fp16``: that type on any device (fp16 trains with a gradient scaler).

Only the network runs in reduced precision: the noise schedule's arithmetic, the losses (computed on the
float32 outputs), the optimiser and the EMA stay in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from spinediff.errors import SpineDiffError
from spinediff.utilities.device import PRECISIONS


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast type for ``precision`` on ``device``; None: float32, no autocast."""
    if precision not in PRECISIONS:
        raise SpineDiffError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    device = torch.device(device)
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


@contextlib.contextmanager
def autocast(device: torch.device | str, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` for ``dtype`` on the device's type; nothing for None."""
    with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
        yield


def as_float32(output):
    """A network's output (a tensor or a list of them, deep supervision) in float32."""
    if isinstance(output, (list, tuple)):
        return type(output)(o.float() for o in output)
    return output.float()


class AutocastNetwork(nn.Module):
    """``network`` called under autocast, its outputs returned in float32 (for the sampler, which adds them to
    float32 states). Attribute reads fall through to the wrapped network (``num_classes``, ...)."""

    def __init__(self, network: nn.Module, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.network = network
        self.dtype = dtype
        self.device_type = torch.device(device).type

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return as_float32(self.network(*args, **kwargs))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("network"), name)
