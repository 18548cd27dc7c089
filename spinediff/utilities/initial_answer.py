"""Initial answers: another model's predictions, read and brought onto a case's preprocessed grid, where a diffusion
model refines them (SpineSegDiff's "presegmentation"; a regression's synthetic CT for translation).

A folder of initial answers holds, per case, one of:

- ``CASE.npz`` (array ``probabilities``, ``(C, *raw)``) and optionally ``CASE.pkl``: class probabilities, as written
  by ``nnUNetv2_predict --save_probabilities``, nnU-Net's validation with ``--npz`` and ``spinediff predict
  --save-probabilities``;
- ``CASE{ending}``: a label map (taken one-hot) or, for translation, the target image in its units (HU).

nnU-Net's ``.npz`` holds the probabilities on the raw image's grid in the reader's array axis order (nnU-Net's
exporter resamples to the cropped shape, reverts the crop with background 1 outside it and applies
``transpose_backward``: ``convert_predicted_logits_to_segmentation_with_correct_shape``); its ``.pkl`` holds the
case's properties, among them the geometry (``sitk_stuff``). spinediff writes the same layout without a ``.pkl``.
Preprocessing is repeated here as nnU-Net's preprocessor does it for images: ``transpose_forward``, the case's
crop (``bbox_used_for_cropping``) and resampling to the preprocessed shape (probabilities with the plans'
``resampling_fn_probabilities``, images with ``resampling_fn_data``). Scaling to the diffusion range is the task's
(``2 p - 1`` for class probabilities, the target intensity mapping for images) and done by the caller.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from spinediff.errors import SpineDiffError
from spinediff.utilities.geometry import same_geometry

PROBABILITY_SUFFIX = ".npz"


def _image_geometry(shape_xyz: Sequence[int], stuff: dict) -> sitk.Image:
    image = sitk.Image([int(s) for s in shape_xyz], sitk.sitkUInt8)
    image.SetSpacing([float(s) for s in stuff["spacing"]])
    image.SetOrigin([float(s) for s in stuff["origin"]])
    image.SetDirection([float(s) for s in stuff["direction"]])
    return image


@dataclass(frozen=True)
class InitialAnswerFolder:
    """A folder of initial answers (module docstring); ``ending`` is the dataset's file ending."""

    path: Path
    ending: str = ".nii.gz"

    @classmethod
    def open(cls, path: str | Path, ending: str = ".nii.gz") -> InitialAnswerFolder:
        folder = Path(path)
        if not folder.is_dir():
            raise SpineDiffError(f"--init-from {folder}: no such folder. Give the folder of another model's "
                                 "predictions (nnUNetv2_predict --save_probabilities, or spinediff predict "
                                 "--save-probabilities).")
        return cls(folder, ending)

    def file_of(self, case: str) -> Path | None:
        """The case's answer: its probabilities if present, else its label map / image; None when it has none."""
        for candidate in (self.path / f"{case}{PROBABILITY_SUFFIX}", self.path / f"{case}{self.ending}"):
            if candidate.is_file():
                return candidate
        return None

    def check_cases(self, cases: Iterable[str]) -> None:
        """Raise, naming them, when any of ``cases`` has no answer here (checked before any work)."""
        missing = [case for case in cases if self.file_of(case) is None]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise SpineDiffError(f"--init-from {self.path}: no initial answer for {len(missing)} case(s) ({shown}); "
                                 f"expected CASE{PROBABILITY_SUFFIX} (class probabilities) or CASE{self.ending}. "
                                 "Predict them with the initial model first (or use --init-model).")

    def check_classes(self, case: str, num_classes: int) -> None:
        """Raise when the case's probabilities do not have ``num_classes`` channels (cheap: reads the npz header)."""
        path = self.file_of(case)
        if path is None or path.suffix != PROBABILITY_SUFFIX:
            return
        with np.load(path) as archive:
            if "probabilities" not in archive.files:
                raise SpineDiffError(f"{path} holds no 'probabilities' array ({archive.files}); it is not an nnU-Net "
                                     "or spinediff probability file.")
            channels = archive["probabilities"].shape[0]
        if channels != num_classes:
            raise SpineDiffError(f"{path} has {channels} class channel(s); the model predicts {num_classes} "
                                 "(background included). It was predicted for another label set.")

    # ------------------------------------------------------------------ raw grid
    def raw_probabilities(self, case: str, num_classes: int, properties: dict,
                          raw_shape: tuple[int, ...]) -> np.ndarray:
        """``(num_classes, *raw_shape)`` class probabilities on the raw grid (reader's axis order) of the case whose
        nnU-Net ``properties`` are given (:func:`raw_shape`); a label map becomes one-hot."""
        path = self.file_of(case)
        if path is None:
            self.check_cases([case])
        if path.suffix == PROBABILITY_SUFFIX:
            self.check_classes(case, num_classes)
            with np.load(path) as archive:
                values = np.asarray(archive["probabilities"], dtype=np.float32)
            self._check_grid(path, values.shape[1:], raw_shape, self._saved_geometry(path), properties)
            return values
        labels = self._read(path, properties, raw_shape)
        if labels.min() < 0 or labels.max() >= num_classes or not np.all(np.equal(np.mod(labels, 1), 0)):
            raise SpineDiffError(f"{path} holds values outside the labels 0..{num_classes - 1}; it is not a label map "
                                 "of this model's classes.")
        return np.eye(num_classes, dtype=np.float32)[labels.astype(np.int64)].transpose(
            len(raw_shape), *range(len(raw_shape)))

    def raw_image(self, case: str, properties: dict, raw_shape: tuple[int, ...], channels: int = 1) -> np.ndarray:
        """``(channels, *raw_shape)`` target image(s) in their units (e.g. HU): ``CASE{ending}``, or
        ``CASE_XXXX{ending}`` per channel when there are several."""
        if channels == 1:
            path = self.path / f"{case}{self.ending}"
            if not path.is_file():
                raise SpineDiffError(f"--init-from {self.path}: no initial answer {path.name} for case {case}.")
            return self._read(path, properties, raw_shape)[None].astype(np.float32)
        arrays = []
        for c in range(channels):
            path = self.path / f"{case}_{c:04d}{self.ending}"
            if not path.is_file():
                raise SpineDiffError(f"--init-from {self.path}: no initial answer {path.name} for case {case}.")
            arrays.append(self._read(path, properties, raw_shape))
        return np.stack(arrays).astype(np.float32)

    def _read(self, path: Path, properties: dict, raw_shape: tuple[int, ...]) -> np.ndarray:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise SpineDiffError(f"{path} could not be read ({exc}).") from None
        array = sitk.GetArrayFromImage(image)
        stuff = properties.get("sitk_stuff")
        if stuff is not None and array.shape == raw_shape:
            difference = same_geometry(_image_geometry(image.GetSize(), stuff), image)
            if difference is not None:
                raise SpineDiffError(f"{path} does not lie on its case's image grid: {difference}. Predict the initial "
                                     "answer from the same images.")
        self._check_grid(path, array.shape, raw_shape, None, properties)
        return array

    @staticmethod
    def _saved_geometry(path: Path) -> dict | None:
        pkl = path.with_suffix(".pkl")
        if not pkl.is_file():
            return None
        try:
            with open(pkl, "rb") as handle:
                saved = pickle.load(handle)  # noqa: S301 - nnU-Net's own properties file beside its prediction
        except (pickle.UnpicklingError, EOFError, OSError, AttributeError, ModuleNotFoundError) as exc:
            raise SpineDiffError(f"{pkl} could not be read as nnU-Net properties ({exc}).") from None
        return saved.get("sitk_stuff") if isinstance(saved, dict) else None

    @staticmethod
    def _check_grid(path: Path, shape: Sequence[int], raw_shape: tuple[int, ...], saved: dict | None,
                    properties: dict) -> None:
        if tuple(int(s) for s in shape) != raw_shape:
            raise SpineDiffError(f"{path} has the grid {tuple(shape)}; its case's image has {raw_shape}. The initial "
                                 "answer must be predicted on the same raw image (nnU-Net exports on the input grid).")
        stuff = properties.get("sitk_stuff")
        if saved is not None and stuff is not None:
            size = tuple(reversed(raw_shape))
            difference = same_geometry(_image_geometry(size, stuff), _image_geometry(size, saved))
            if difference is not None:
                raise SpineDiffError(f"{path}: the geometry in {path.with_suffix('.pkl').name} differs from its case's "
                                     f"image: {difference}. It was predicted from another image.")


def raw_shape(properties: dict, plans_manager) -> tuple[int, ...]:
    """The raw image's array shape (the reader's axis order) from nnU-Net's properties of a preprocessed case."""
    shape = properties.get("shape_before_cropping")
    if shape is None:
        raise SpineDiffError("nnU-Net properties without shape_before_cropping: preprocess the case with nnU-Net's "
                             "preprocessor first.")
    return tuple(int(shape[i]) for i in plans_manager.transpose_backward)


def to_preprocessed_grid(values: np.ndarray, properties: dict, plans_manager, configuration_manager,
                         target_shape: Sequence[int], kind: str = "probabilities") -> np.ndarray:
    """``(C, *raw)`` values (raw array axis order) → ``(C, *target_shape)`` on the case's preprocessed grid, as nnU-Net
    preprocesses an image: transpose, the case's crop, resampling (``kind``: ``probabilities`` renormalised to sum 1,
    or ``image``)."""
    forward = list(plans_manager.transpose_forward)
    data = np.asarray(values, dtype=np.float32).transpose([0, *[i + 1 for i in forward]])
    if tuple(data.shape[1:]) != tuple(int(s) for s in properties["shape_before_cropping"]):
        raise SpineDiffError(f"initial answer of shape {values.shape[1:]} does not fit the case's image "
                             f"(transposed {tuple(properties['shape_before_cropping'])}).")
    bbox = properties["bbox_used_for_cropping"]
    data = data[(slice(None), *[slice(int(a), int(b)) for a, b in bbox])]
    original_spacing = [float(properties["spacing"][i]) for i in forward]
    target_spacing = list(configuration_manager.spacing)
    if len(target_spacing) < data.ndim - 1:  # 2D plans keep the slice spacing
        target_spacing = [original_spacing[0], *target_spacing]
    target_shape = tuple(int(s) for s in target_shape)
    if tuple(data.shape[1:]) != target_shape:
        resample = (configuration_manager.resampling_fn_probabilities if kind == "probabilities"
                    else configuration_manager.resampling_fn_data)
        data = resample(data, target_shape, original_spacing, target_spacing)
        data = np.asarray(data.cpu() if hasattr(data, "cpu") else data, dtype=np.float32)
    if kind == "probabilities":
        data = np.clip(data, 0, None)
        data = data / np.clip(data.sum(0, keepdims=True), 1e-6, None)
    return data
