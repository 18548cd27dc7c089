"""Image and file I/O: atomic writes and reads that fail with clear messages."""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from spinediff.errors import SpineDiffError

#: The lock file of a folder in use (spinediff.utilities.lock); an output folder holding only it counts as empty.
LOCK_NAME = ".spinediff.lock"

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


# errno values that mean "this device or folder takes no more writes"; always reported as the output's fault
_DEVICE_ERRORS = {errno.ENOSPC: "no space left on the device holding {folder}",
                  errno.EDQUOT: "the disk quota of the device holding {folder} is exhausted",
                  errno.EROFS: "{folder} is on a read-only file system",
                  errno.EFBIG: "the file is larger than the device holding {folder} allows"}
_PERMISSION_ERRORS = {errno.EACCES: "permission denied in {folder}", errno.EPERM: "permission denied in {folder}"}


def _free_bytes(folder: Path) -> int | None:
    with contextlib.suppress(OSError):
        stat = os.statvfs(folder)
        return stat.f_bavail * stat.f_frsize
    return None


def write_error(target: Path, error: OSError) -> SpineDiffError | None:
    """The SpineDiffError for an OSError met while writing ``target``, or None when the error is not the output's
    (e.g. a missing input read inside an :func:`atomic_path` block)."""
    folder = target.parent
    reason = _DEVICE_ERRORS.get(error.errno)
    if reason is None and error.errno in _PERMISSION_ERRORS:
        culprit = Path(error.filename) if error.filename else None
        if culprit is None or folder in (culprit, *culprit.parents):
            reason = _PERMISSION_ERRORS[error.errno]
    if reason is None:
        return None
    fix = ("free space or choose another output" if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
           else "choose an output folder you can write to")
    return SpineDiffError(f"Could not write {target}: {reason.format(folder=folder)} ({error.strerror}); {fix}. "
                          "Nothing was written under that name.")


def _incomplete(target: Path, detail: str) -> SpineDiffError:
    free = _free_bytes(target.parent)
    where = f"; the device holding {target.parent} has {free / 1e6:.1f} MB free" if free is not None else ""
    hint = (f"No space left on the device holding {target.parent}: free space or choose another output"
            if free is not None and free < 1 << 20 else
            f"Check the device holding {target.parent} (free space, quota, errors) or choose another output")
    return SpineDiffError(f"Could not write {target}: the file was not written completely ({detail}{where}). "
                          f"{hint}. Nothing was written under that name.")


def _verify_image(tmp: Path, suffix: str) -> str | None:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(tmp))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        return f"its header cannot be read back: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}"
    if suffix == ".nii.gz":
        try:  # the whole gzip stream, its CRC and length: a short write is caught here
            with gzip.open(tmp, "rb") as stream:
                data_bytes = 0
                while chunk := stream.read(1 << 22):
                    data_bytes += len(chunk)
        except (OSError, EOFError, zlib.error) as exc:
            return f"its compressed data is truncated or corrupt: {exc}"
    elif suffix == ".nii":
        data_bytes = tmp.stat().st_size
    else:  # MetaImage and NRRD: SimpleITK's full read fails on data shorter than the header announces
        try:
            sitk.ReadImage(str(tmp))
        except RuntimeError as exc:
            return f"its voxels cannot be read back: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}"
        return None
    import nibabel as nib

    try:
        header = nib.load(str(tmp)).header
        voxels = int(np.prod(header.get_data_shape()))
        needed = int(header.get_data_offset()) + voxels * header.get_data_dtype().itemsize
    except Exception as exc:  # noqa: BLE001 - any nibabel failure means a damaged file
        return f"nibabel cannot read it back: {exc}"
    if data_bytes < needed:
        return f"{data_bytes} bytes of the {needed} its header announces"
    return None


def _verify_zip(tmp: Path) -> str | None:
    try:
        with zipfile.ZipFile(tmp) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        return f"the archive is truncated or corrupt: {exc}"
    return f"member {bad} fails its CRC check" if bad else None


def verify_written(tmp: Path, suffix: str, expected_size: int | None = None, allow_empty: bool = False) -> str | None:
    """Why the freshly written ``tmp`` (a file whose final name ends in ``suffix``) is not complete, or None.

    Every file must be non-empty (unless ``allow_empty``) and of ``expected_size`` when the writer knows it; images
    are read back (SimpleITK header; NIfTI: the whole gzip stream and the voxel bytes the header announces), zip
    containers (``.npz``, torch checkpoints) pass zipfile's CRC test. SimpleITK does not report a short write."""
    size = tmp.stat().st_size
    if expected_size is not None and size != expected_size:
        return f"{size} of {expected_size} bytes"
    if size == 0 and not allow_empty:
        return "0 bytes"
    if suffix in IMAGE_SUFFIXES:
        return _verify_image(tmp, suffix)
    if suffix in (".npz", ".pth", ".pt", ".zip") and zipfile.is_zipfile(tmp):
        return _verify_zip(tmp)
    if suffix in (".npz", ".zip"):
        return "not a complete zip archive"
    return None


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system syncs a directory (EINVAL)
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, expected_size: int | None = None,
                allow_empty: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is verified, synced and renamed onto ``target``.

    The temporary file keeps the target's suffix so that writers choosing a format by extension (SimpleITK,
    matplotlib, torch, numpy) behave the same. Before the rename the file is checked (:func:`verify_written`: not
    empty, images read back, archives CRC-checked) and ``fsync``-ed; the folder is synced after. On any failure
    nothing appears under ``target`` (an existing ``target`` is left as it was) and a full, read-only or
    forbidden device is a :class:`SpineDiffError` naming the file and the cause.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        suffix = _suffix(target)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
        os.close(fd)
    except OSError as error:
        raise (write_error(target, error) or error) from error
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        problem = verify_written(tmp_path, suffix, expected_size, allow_empty)
        if problem is not None:
            raise _incomplete(target, problem)
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        # mkstemp makes the file private (0600); a result gets the permissions any new file gets (the umask's)
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        converted = write_error(target, error)
        if converted is None:
            raise
        raise converted from error
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise
    _fsync_folder(target.parent)


def to_builtin(value: Any) -> Any:
    """Plain Python of ``value`` for JSON files and checkpoints loaded with ``weights_only=True``: numpy scalars and
    arrays (also as dict keys), paths and torch devices converted, dicts, lists and tuples recursed (tuples become
    lists). The one converter (nnunetv2's ``recursive_fix_for_json_export`` converts only some numpy types, in place):
    ``write_json`` and the trainers' checkpoints use it."""
    if isinstance(value, dict):
        return {to_builtin(k): to_builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_builtin(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if type(value).__module__ == "torch" and type(value).__name__ == "device":  # e.g. TrainingOptions.device
        return str(value)
    return value


def write_json(data: Any, target: str | os.PathLike, indent: int = 2) -> None:
    """Write JSON atomically (numpy scalars and arrays, paths and devices converted by :func:`to_builtin`)."""

    def default(obj: Any) -> Any:
        raise TypeError(f"cannot serialise {type(obj).__name__}")

    payload = (json.dumps(to_builtin(data), indent=indent, default=default) + "\n").encode()
    with atomic_path(target, expected_size=len(payload)) as tmp:
        tmp.write_bytes(payload)


def write_text(text: str, target: str | os.PathLike) -> None:
    """Write UTF-8 text atomically (checked to be complete on disk)."""
    payload = text.encode()
    with atomic_path(target, expected_size=len(payload), allow_empty=not payload) as tmp:
        tmp.write_bytes(payload)


def write_bytes(data: bytes, target: str | os.PathLike) -> None:
    """Write bytes atomically (checked to be complete on disk)."""
    with atomic_path(target, expected_size=len(data), allow_empty=not data) as tmp:
        tmp.write_bytes(data)


def copy_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy ``source`` onto ``target`` atomically, keeping its times (as shutil.copy2)."""
    import shutil

    source = Path(source)
    with atomic_path(target, expected_size=source.stat().st_size, allow_empty=True) as tmp:
        shutil.copy2(source, tmp)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if path.is_dir():
        raise SpineDiffError(f"{path} is a folder, not a file: a JSON file belongs there.")
    if not path.is_file():
        raise SpineDiffError(f"{path} does not exist.")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpineDiffError(f"{path} is not valid JSON ({exc}). Fix or regenerate the file.") from exc


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read a NIfTI/MHA/NRRD image with SimpleITK; missing or corrupt files raise SpineDiffError."""
    path = Path(path)
    if path.is_dir():
        raise SpineDiffError(f"{path} is a folder, not a file: an image file belongs there.")
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


def write_probabilities(probabilities, target: str | os.PathLike) -> None:
    """Class probabilities ``(C, *shape)`` as ``CASE.npz`` (array ``probabilities``, float32: the layout of nnU-Net's
    ``--save_probabilities``), written atomically."""
    import numpy as np

    with atomic_path(target) as tmp:
        np.savez_compressed(tmp, probabilities=np.asarray(probabilities, dtype=np.float32))


def write_image(image: sitk.Image, target: str | os.PathLike, compress: bool = True) -> None:
    """Write an image atomically; it is read back before it takes its name (SimpleITK misses short writes)."""
    with atomic_path(target) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), compress)
        except RuntimeError as exc:
            message = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
            folder, free = Path(target).parent, _free_bytes(Path(target).parent)
            if "no space" in message.lower() or (free is not None and free < 1 << 20):
                raise SpineDiffError(f"Could not write {target}: no space left on the device holding {folder} "
                                     f"(SimpleITK: {message}); free space or choose another output. Nothing was "
                                     "written under that name.") from exc
            raise SpineDiffError(f"Could not write {target}: SimpleITK failed ({message}). Check free space and "
                                 "permissions of the output folder. Nothing was written under that name.") from exc


def ensure_new_output(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse to overwrite existing results unless ``overwrite`` is set."""
    path = Path(path)
    if path.exists() and not overwrite:
        if path.is_dir() and not any(p for p in path.iterdir() if not p.name.endswith(LOCK_NAME)):
            return path  # empty, or holding only the lock this run took (spinediff.utilities.lock)
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
