"""Image and file I/O: atomic writes and reads that fail with clear messages."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from spinediff.errors import SpineDiffError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")


def _suffix(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix


def _umask() -> int:
    """The process's umask; read from /proc on Linux (setting it to read it back would race other threads)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed onto ``target``.

    The temporary file keeps the target's suffix so that writers choosing a format by
    extension (SimpleITK, matplotlib, torch) behave the same. On error nothing is left behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = _suffix(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600); a result gets the permissions any new file gets (the umask's)
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_json(data: Any, target: str | os.PathLike, indent: int = 2) -> None:
    """Write JSON atomically (numpy scalars and arrays are converted)."""

    def default(obj: Any) -> Any:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, Path):
            return str(obj)
        if type(obj).__module__ == "torch" and type(obj).__name__ == "device":  # e.g. TrainingOptions.device
            return str(obj)
        raise TypeError(f"cannot serialise {type(obj).__name__}")

    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=indent, default=default) + "\n")


def write_text(text: str, target: str | os.PathLike) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise SpineDiffError(f"{path} does not exist.")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpineDiffError(f"{path} is not valid JSON ({exc}). Fix or regenerate the file.") from exc


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read a NIfTI/MHA/NRRD image with SimpleITK; missing or corrupt files raise SpineDiffError."""
    path = Path(path)
    if not path.is_file():
        raise SpineDiffError(f"{path} does not exist.")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
        raise SpineDiffError(
            f"{path} could not be read as an image ({first_line}). The file is corrupt or not in a "
            f"supported format ({', '.join(IMAGE_SUFFIXES)}); re-export it."
        ) from exc


def read_voxels_verified(path: str | os.PathLike, image: sitk.Image) -> np.ndarray:
    """The voxels of ``path`` as stored on disk. NIfTI voxels are read with nibabel, which fails on a truncated
    file that SimpleITK reads as mostly zeros, and keeps NaN that SimpleITK's NIfTI reader turns into 0."""
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        return sitk.GetArrayViewFromImage(image)
    import nibabel as nib

    try:
        return np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as exc:  # noqa: BLE001 - any nibabel failure means a corrupt file
        raise SpineDiffError(f"{path} could not be read completely ({exc}); the file is corrupt or truncated. "
                             "Re-export or re-copy it.") from exc


def write_image(image: sitk.Image, target: str | os.PathLike, compress: bool = True) -> None:
    """Write an image atomically."""
    with atomic_path(target) as tmp:
        sitk.WriteImage(image, str(tmp), compress)


def ensure_new_output(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse to overwrite existing results unless ``overwrite`` is set."""
    path = Path(path)
    if path.exists() and not overwrite:
        if path.is_dir() and not any(path.iterdir()):
            return path
        raise SpineDiffError(f"{path} already exists. Choose another output or pass --overwrite to replace it.")
    return path


def index_to_physical(image: sitk.Image, zyx_indices: tuple[np.ndarray, ...] | np.ndarray) -> np.ndarray:
    """Voxel indices in numpy (z, y, x) order -> (N, 3) physical points (x, y, z), vectorised."""
    zyx = np.asarray(zyx_indices, dtype=float)
    ijk = zyx[::-1].T  # (N, 3) in ITK index order
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    origin = np.asarray(image.GetOrigin(), dtype=float)
    return origin + (ijk * spacing) @ direction.T


def ensure_writable_folder(path: str | os.PathLike, create: bool = True) -> Path:
    """Check, before any work, that ``path`` is (or can become) a folder this process can write into; create it
    unless ``create`` is False (then only its nearest existing parent is checked, and nothing is made)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SpineDiffError(f"The output {path} is a file, not a folder. Give a folder path.")
    if not create:
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            raise SpineDiffError(f"Cannot write into the output folder {path} ({probe} is not a writable folder). "
                                 "Choose a folder you can write to.")
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".spinediff-write-test-"):
            pass
    except OSError as error:
        raise SpineDiffError(f"Cannot write into the output folder {path} ({error.strerror}). Choose a folder you "
                             "can write to.") from error
    return path
