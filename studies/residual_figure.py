"""Look at what the residual diffusion adds to the regression (issue 35): one slice of a validation case, per row the
real CT, the regression's synthetic CT and each refined CT, with its absolute error to the real CT and (for the
refined ones) its difference to the regression. The difference column is the texture the samples add; the error
column shows whether it lands where the regression was wrong.

    python -m studies.residual_figure --reference CT.nii.gz --regression REG.nii.gz \\
        --refined "v, 0.1 T, K = 1=REFINED1.nii.gz" "v, 0.1 T, K = 5=REFINED5.nii.gz" -o figure.png

All images must share the reference's grid (the validation exports of ``spinediff benchmark`` do). ``--axis`` picks the
slicing axis of the array (z, y, x); the middle slice along it is drawn.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

WINDOW = (-200.0, 1000.0)  # HU shown for the images
ERROR_RANGE = 500.0  # HU, absolute error and difference colour limit


def read(path: str) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="the real CT")
    parser.add_argument("--regression", required=True, help="the regression's synthetic CT")
    parser.add_argument("--refined", nargs="+", required=True, metavar="LABEL=PATH", help="refined CTs, labelled")
    parser.add_argument("--axis", type=int, default=0, choices=[0, 1, 2], help="array axis sliced (0: z)")
    parser.add_argument("-o", "--output", required=True, help="the PNG written")
    args = parser.parse_args(argv)

    refined = []
    for item in args.refined:
        label, sep, path = item.rpartition("=")
        if not sep or not label:
            print(f"--refined {item!r}: write LABEL=PATH", file=sys.stderr)
            return 2
        refined.append((label, path))
    paths = [args.reference, args.regression, *(p for _, p in refined)]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        print(f"{missing[0]} does not exist; give the validation exports of the benchmark.", file=sys.stderr)
        return 2
    reference = read(args.reference)
    regression = read(args.regression)
    images = [(label, read(path)) for label, path in refined]
    for label, image in [("regression", regression), *images]:
        if image.shape != reference.shape:
            print(f"{label}: shape {image.shape} is not the reference's {reference.shape}; give images on the "
                  "reference's grid.", file=sys.stderr)
            return 2

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = reference.shape[args.axis] // 2

    def cut(volume: np.ndarray) -> np.ndarray:  # the middle slice along --axis
        return np.take(volume, index, axis=args.axis)

    body = cut(reference) > -500
    rows = [("real CT", reference, None), ("regression", regression, None),
            *((label, image, regression) for label, image in images)]
    fig, axes = plt.subplots(len(rows), 3, figsize=(11, 2.9 * len(rows)), squeeze=False)
    for row, (label, image, base) in zip(axes, rows, strict=True):
        row[0].imshow(cut(image), cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1])
        error = np.abs(cut(image) - cut(reference))
        mae = float(error[body].mean())
        row[0].set_title(label if label == "real CT" else f"{label}: body MAE {mae:.1f} HU (this slice)", fontsize=8)
        if label != "real CT":
            row[1].imshow(error, cmap="magma", vmin=0, vmax=ERROR_RANGE)
            row[1].set_title(f"|error| (0-{ERROR_RANGE:g} HU)", fontsize=8)
        if base is not None:
            difference = cut(image) - cut(base)
            row[2].imshow(difference, cmap="coolwarm", vmin=-ERROR_RANGE / 5, vmax=ERROR_RANGE / 5)
            row[2].set_title(f"minus the regression (±{ERROR_RANGE / 5:g} HU); mean |.| "
                             f"{float(np.abs(difference[body]).mean()):.1f}", fontsize=8)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
