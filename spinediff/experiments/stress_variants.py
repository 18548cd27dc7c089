"""The stress test's variants of a scan (issue 34): how much is cut off or padded at either end along the spine, by
name (the fixed :data:`VARIANTS`, or any amount: ``crop_top_10``, ``crop_bottom_5``, ...), and the varied image and
labels (:func:`make_variant`). Used by :mod:`spinediff.experiments.stress` and the studies that vary scans as it
does."""

from __future__ import annotations

import re

from spinediff.errors import SpineDiffError

VARIANTS = {  # name: (crop fraction at the top, crop at the bottom, pad at the top, pad at the bottom)
    "plain": (0.0, 0.0, 0.0, 0.0),
    "crop_top_20": (0.20, 0.0, 0.0, 0.0),
    "crop_top_35": (0.35, 0.0, 0.0, 0.0),
    "crop_bottom_20": (0.0, 0.20, 0.0, 0.0),
    "crop_bottom_35": (0.0, 0.35, 0.0, 0.0),
    "pad_top_30": (0.0, 0.0, 0.30, 0.0),
    "pad_bottom_30": (0.0, 0.0, 0.0, 0.30),
    "shift_down_20": (0.20, 0.0, 0.0, 0.20),
}
#: Further variants by name, N in percent of the scan's length along the spine: crop_top_N, crop_bottom_N (1-90),
#: pad_top_N, pad_bottom_N (1-200), shift_down_N, shift_up_N (1-90: N % cut at one end, N % padded at the other).
VARIANT_PATTERN = re.compile(r"(crop|pad|shift)_(top|bottom|down|up)_(\d+)")


def variant_fractions(name: str) -> tuple[float, float, float, float]:
    """The (crop top, crop bottom, pad top, pad bottom) fractions of a variant: one of :data:`VARIANTS` or a name of
    :data:`VARIANT_PATTERN` (e.g. ``crop_top_10``: the top 10 % cut); :class:`SpineDiffError` naming the forms for any
    other name."""
    if name in VARIANTS:
        return VARIANTS[name]
    match = VARIANT_PATTERN.fullmatch(name)
    kind, side, number = match.groups() if match else (None, None, "0")
    percent = int(number)
    limit = 200 if kind == "pad" else 90
    fits = {"crop": ("top", "bottom"), "pad": ("top", "bottom"), "shift": ("down", "up")}.get(kind, ())
    if side not in fits or not 1 <= percent <= limit:
        raise SpineDiffError(f"Unknown stress variant {name!r}: use one of {', '.join(VARIANTS)}, or crop_top_N, "
                             "crop_bottom_N, shift_down_N, shift_up_N (N = 1-90, percent of the scan's length along "
                             "the spine), pad_top_N, pad_bottom_N (N = 1-200).")
    f = percent / 100.0
    return {("crop", "top"): (f, 0.0, 0.0, 0.0), ("crop", "bottom"): (0.0, f, 0.0, 0.0),
            ("pad", "top"): (0.0, 0.0, f, 0.0), ("pad", "bottom"): (0.0, 0.0, 0.0, f),
            ("shift", "down"): (f, 0.0, 0.0, f), ("shift", "up"): (0.0, f, f, 0.0)}[(kind, side)]


#: ``--variants``' help, for the scripts that take it.
VARIANTS_HELP = (f"variants (default: all): {', '.join(VARIANTS)}, or by amount: crop_top_N, crop_bottom_N, "
                 "shift_down_N, shift_up_N, pad_top_N, pad_bottom_N (N: percent of the scan's length along the spine)")


def variant_argument(text: str) -> str:
    """``--variants``' argument type: a variant name :func:`variant_fractions` knows (argparse's error otherwise)."""
    import argparse

    try:
        variant_fractions(text)
    except SpineDiffError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def kept_range(length: int, fractions: tuple[float, float, float, float], sign: int) -> tuple[int, int]:
    """The array indices [start, stop) a variant's crop keeps of ``length`` voxels along the spine axis; ``sign`` -1:
    the first level (the top) lies at the high-index end, so the top crop comes off there."""
    crop_top, crop_bottom = fractions[0], fractions[1]
    if sign < 0:
        crop_top, crop_bottom = crop_bottom, crop_top
    return int(round(crop_top * length)), length - int(round(crop_bottom * length))


def make_variant(image, label, axis: int, sign: int, fractions: tuple[float, float, float, float]):
    """``image`` and ``label`` (SimpleITK) cropped/padded along numpy ``axis``; 'top' is the first level's side."""
    import SimpleITK as sitk

    pad_top, pad_bottom = fractions[2], fractions[3]
    if sign < 0:  # the first level lies at the high-index end
        pad_top, pad_bottom = pad_bottom, pad_top
    index_axis = 2 - axis
    length = image.GetSize()[index_axis]
    start, stop = kept_range(length, fractions, sign)
    slices = [slice(None)] * 3
    slices[index_axis] = slice(start, stop)
    image, label = image[tuple(slices)], label[tuple(slices)]
    low, high = [0, 0, 0], [0, 0, 0]
    low[index_axis], high[index_axis] = int(round(pad_top * length)), int(round(pad_bottom * length))
    if any(low) or any(high):
        background = float(sitk.GetArrayViewFromImage(image).min())
        image = sitk.ConstantPad(image, low, high, background)
        label = sitk.ConstantPad(label, low, high, 0)
    return image, label
