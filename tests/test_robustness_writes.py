"""Writes that cannot lie, one run per output folder, preprocessing that is complete or absent (issue 33).

- a full disk (a tiny tmpfs, where this machine lets us mount one) or a writer that stops short leaves no file under
  a final name, and the command ends with exit 2 and a message naming the file;
- a second run into a folder another live run holds is refused at once with the other's PID; a lock left by a dead
  process is reported and taken over;
- ``kill -9`` of ``spinediff plan`` in the middle, then a rerun that says what was incomplete and redoes it, then
  ``train``; ``train`` refuses a preprocessed folder with missing or damaged cases before it starts;
- ``ensemble -o`` equal to, inside or around one of its inputs is refused, also with ``--overwrite``.

The CLI failure cases go through :func:`test_robustness.run_cli` (exit 2, the message on stderr, no traceback,
nothing created or changed) and so land in the ``SPINEDIFF_ROBUSTNESS_TABLE`` record as the others do.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import nnunet_folders
from test_robustness import NAME, _evaluation_folders, run_cli, snapshot, write_raw

from spinediff.cli import main
from spinediff.errors import SpineDiffError
from spinediff.io import write_image, write_json, write_text
from spinediff.planning.completion import RECORD
from spinediff.utilities.lock import LOCK_NAME, folder_lock

TINY_PHANTOM = ["--cases", "1", "--task", "segmentation", "--shape", "48", "64", "8", "--mr-spacing", "3.2", "3.2",
                "7.0", "--ct-spacing", "3", "3", "3"]


@pytest.fixture
def world(tmp_path, monkeypatch) -> Path:
    """As in test_robustness: $nnUNet_raw with one small valid dataset, empty preprocessed and results folders."""
    for key in ("raw", "preprocessed", "results"):
        (tmp_path / key).mkdir()
        monkeypatch.setenv(f"nnUNet_{key}", str(tmp_path / key))
    write_raw(tmp_path / "raw")
    return tmp_path


def _volume() -> sitk.Image:
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(16, 48, 48)).astype(np.float32))
    image.SetSpacing((1.0, 1.0, 2.0))
    return image


# ---------------------------------------------------------------------- (a) a full disk, a short write
@pytest.fixture
def tiny_disk(tmp_path) -> Path:
    """A 16 KiB tmpfs: room for a few small files, not for an image."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_leaves_no_file_under_a_final_name(tiny_disk):
    for name in ("ct.nii.gz", "ct.nii", "ct.mha", "ct.nrrd"):
        with pytest.raises(SpineDiffError) as error:
            write_image(_volume(), tiny_disk / name)
        assert name in str(error.value)
        assert "no space left on the device" in str(error.value).lower()
        assert os.listdir(tiny_disk) == [], f"{name}: {os.listdir(tiny_disk)}"
    with pytest.raises(SpineDiffError, match="no space left"):
        write_json({"values": list(range(20000))}, tiny_disk / "summary.json")
    with pytest.raises(SpineDiffError, match="no space left"):
        write_text("x" * 40000, tiny_disk / "table.csv")
    assert os.listdir(tiny_disk) == []
    write_json({"small": 1}, tiny_disk / "small.json")  # what fits is written as before
    assert json.loads((tiny_disk / "small.json").read_text()) == {"small": 1}


def test_full_disk_through_the_command_line(tiny_disk, capsys):
    """`spinediff phantom -o` onto the full disk: exit 2 naming the device, nothing left on it."""
    outcome = run_cli(["phantom", "-o", str(tiny_disk), *TINY_PHANTOM], tiny_disk, capsys)
    assert "no space left on the device" in outcome.message.lower()
    assert str(tiny_disk) in outcome.message
    assert sorted(os.listdir(tiny_disk)) == []


def test_a_full_disk_under_evaluate(world, tiny_disk, capsys):
    """The disk already full (a filler file): `spinediff evaluate -o` on it is refused with exit 2 and the device,
    its CSV and JSON never appear, the folder it would have made is gone again."""
    reference, prediction = _evaluation_folders(world)
    with open(tiny_disk / "filler", "wb", buffering=0) as handle, pytest.raises(OSError):
        while True:
            handle.write(b"x" * 4096)
    outcome = run_cli(["evaluate", "-ref", str(reference), "-pred", str(prediction), "-o", str(tiny_disk / "scores")],
                      tiny_disk, capsys)
    assert str(tiny_disk) in outcome.message
    assert sorted(os.listdir(tiny_disk)) == ["filler"]


def _zero_bytes(image, path, *args, **kwargs):
    Path(path).write_bytes(b"")  # what SimpleITK leaves on a full disk, without raising


def _half(original):
    def write(image, path, *args, **kwargs):
        original(image, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
    return write


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii", "ct.mha", "ct.nrrd"])
@pytest.mark.parametrize("short", ["zero_bytes", "half"])
def test_a_short_write_raises_and_keeps_the_old_file(tmp_path, monkeypatch, name, short):
    target = tmp_path / name
    write_image(_volume(), target)
    before = target.read_bytes()
    monkeypatch.setattr(sitk, "WriteImage", _zero_bytes if short == "zero_bytes" else _half(sitk.WriteImage))
    with pytest.raises(SpineDiffError) as error:
        write_image(_volume(), target)
    assert str(target) in str(error.value) and "not written completely" in str(error.value)
    assert target.read_bytes() == before  # the previous file stays, untouched
    assert sorted(os.listdir(tmp_path)) == [name]  # no temporary file left


def test_a_short_write_through_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sitk, "WriteImage", _zero_bytes)
    out = tmp_path / "raw"
    out.mkdir()
    outcome = run_cli(["phantom", "-o", str(out), *TINY_PHANTOM], tmp_path, capsys)
    assert "not written completely" in outcome.message and ".nii.gz" in outcome.message
    assert os.listdir(out) == []


# ---------------------------------------------------------------------- (b) one run per output folder
HOLDER = """
import sys, time
from spinediff.utilities.lock import folder_lock
with folder_lock(sys.argv[1], command="spinediff evaluate (holder)"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def held_folder(tmp_path):
    """A folder whose lock a live second process holds."""
    folder = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        yield folder, process.pid
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("command", ["evaluate", "ensemble"])
def test_a_second_run_into_a_held_folder_is_refused(world, capsys, held_folder, command):
    folder, pid = held_folder
    reference, prediction = _evaluation_folders(world)
    other = world / "pred2"
    shutil.copytree(prediction, other)
    argv = {"evaluate": ["evaluate", "-ref", str(reference), "-pred", str(prediction), "-o", str(folder)],
            "ensemble": ["ensemble", "-i", str(prediction), str(other), "-o", str(folder)]}[command]
    started = time.perf_counter()
    outcome = run_cli(argv, world, capsys)
    assert time.perf_counter() - started < 10  # at once, not after waiting
    assert f"PID {pid}" in outcome.message and str(folder) in outcome.message
    assert "in use" in outcome.message
    assert sorted(os.listdir(folder)) == [LOCK_NAME]  # the holder's lock, nothing else


def test_a_stale_lock_is_reported_and_taken_over(world, capfd):
    reference, prediction = _evaluation_folders(world)
    out = world / "scores"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                             "command": "spinediff evaluate", "started": "2020-01-01T00:00:00"}))
    assert main(["evaluate", "-ref", str(reference), "-pred", str(prediction), "-o", str(out)]) == 0
    err = capfd.readouterr().err
    assert "stale lock" in err and f"PID {dead.pid}" in err
    assert sorted(os.listdir(out)) == ["per_case.csv", "summary.json"]  # the lock is gone after the run


def test_the_lock_is_released_and_reentrant(tmp_path):
    folder = tmp_path / "new" / "deeper"
    with folder_lock(folder), folder_lock(folder):  # the same process may take it twice (nested API calls)
        assert (folder / LOCK_NAME).is_file()
        holder = json.loads((folder / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid()
    assert not (folder / LOCK_NAME).exists()
    with pytest.raises(SpineDiffError), folder_lock(tmp_path / "gone" / "x"):
        raise SpineDiffError("fails before writing anything")
    assert not (tmp_path / "gone").exists()  # the folders it made for nothing are removed again


def test_a_folder_made_by_another_run_between_check_and_mkdir_is_locked_not_refused(tmp_path, monkeypatch):
    """Two runs started together both see no output folder; the one whose mkdir finds it made already takes the lock
    (or is refused by it naming the holder), never "Cannot create the output folder"; it does not remove the other's
    folder on the way out."""
    folder = tmp_path / "out"
    folder.mkdir()
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self: False if self == folder else real_exists(self))
    with folder_lock(folder):
        assert (folder / LOCK_NAME).is_file()
    monkeypatch.undo()
    assert folder.is_dir()  # not removed: this call did not make it
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(Path, "exists", lambda self: False if self == tmp_path / "file" else real_exists(self))
    with pytest.raises(SpineDiffError, match="is not a folder"), folder_lock(tmp_path / "file"):
        pass


# ---------------------------------------------------------------------- (c) preprocessing complete or absent
TRAIN = ["train", "-d", "996", "-c", "2d_diffusion", "-f", "0", "-tr", "DiffusionSegmentationTrainer", "--epochs",
         "1", "--iters-per-epoch", "1", "--val-iters-per-epoch", "1", "--steps", "1", "--val-samples", "1"]
PLAN = ["plan", "-d", "996", "--device", "cpu", "-np", "1", "-q", "-c", "2d_diffusion"]


def _data_folder(world: Path) -> Path:
    from spinediff.planning.plans import SpineDiffPlans

    plans = SpineDiffPlans.read(world / "preprocessed" / NAME / "nnUNetPlans.json")
    return world / "preprocessed" / NAME / plans.configuration("2d_diffusion").manager.data_identifier


def test_killed_plan_is_redone_by_the_rerun_and_train_works(world, capfd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "spinediff.cli", *PLAN], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    folder = world / "preprocessed" / NAME
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None and not (folder / "nnUNetPlans.json").exists():
        time.sleep(0.02)
    assert process.poll() is None, "plan finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    record = json.loads((folder / RECORD).read_text())
    assert record.get("running"), record  # the folder is marked as incomplete
    capfd.readouterr()
    assert main(PLAN) == 0  # no --overwrite needed for an incomplete folder
    err = capfd.readouterr().err
    assert "is incomplete" in err and "interrupted" in err and f"PID {process.pid}" in err
    record = json.loads((folder / RECORD).read_text())
    assert "running" not in record and sorted(record["data"][_data_folder(world).name]) == [
        "case000", "case001", "case002"]
    assert main(PLAN) == 2  # complete now: a rerun without --overwrite is refused again
    assert "already exists" in capfd.readouterr().err
    assert main(TRAIN) == 0
    fold = world / "results" / NAME / "DiffusionSegmentationTrainer__nnUNetPlans__2d_diffusion" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file() and not (fold / LOCK_NAME).exists()


@pytest.fixture(scope="module")
def planned_once(tmp_path_factory) -> Path:
    """The small dataset planned and preprocessed once; each test gets a copy (:func:`planned`)."""
    root = tmp_path_factory.mktemp("planned")
    for key in ("raw", "preprocessed", "results"):
        (root / key).mkdir()
    write_raw(root / "raw")
    with nnunet_folders(root / "raw", root):
        assert main(PLAN) == 0
    return root


@pytest.fixture
def planned(planned_once, tmp_path, monkeypatch) -> Path:
    world = tmp_path / "world"
    shutil.copytree(planned_once, world, symlinks=True)
    for key in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"nnUNet_{key}", str(world / key))
    return world


DAMAGES = {
    "empty_data": lambda d: (d / "case001.b2nd").write_bytes(b""),
    "truncated_properties": lambda d: (d / "case002.pkl").write_bytes((d / "case002.pkl").read_bytes()[:10]),
    "missing_case": lambda d: [p.unlink() for p in d.glob("case001*")],
}


@pytest.mark.parametrize("record", ["with_record", "without_record"])
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_train_refuses_incomplete_preprocessing(planned, capsys, damage, record):
    """Missing, empty or truncated case files, with spinediff's completion record or without it (a folder from
    before it, or from nnUNetv2_preprocess): train stops before it starts, naming the case and the fix."""
    world = planned
    if record == "without_record":
        (world / "preprocessed" / NAME / RECORD).unlink()
    DAMAGES[damage](_data_folder(world))
    outcome = run_cli(TRAIN, world, capsys)
    assert "incomplete" in outcome.message or "not preprocessed" in outcome.message
    assert ("case001" if damage != "truncated_properties" else "case002") in outcome.message
    assert "spinediff plan -d 996" in outcome.message and "--overwrite" in outcome.message


def test_train_refuses_a_split_naming_cases_that_were_not_preprocessed(planned, capsys):
    splits = [{"train": ["case000", "case001"], "val": ["case002", "case007"]}]
    (planned / "preprocessed" / NAME / "splits_final.json").write_text(json.dumps(splits))
    outcome = run_cli(TRAIN, planned, capsys)
    assert "splits_final.json" in outcome.message and "case007" in outcome.message


def test_plan_rerun_redoes_damaged_preprocessing_without_overwrite(planned, capfd):
    data = _data_folder(planned)
    (data / "case001.b2nd").write_bytes(b"")
    capfd.readouterr()
    assert main(PLAN) == 0
    assert "case001" in capfd.readouterr().err
    assert (data / "case001.b2nd").stat().st_size > 0


def test_a_held_fold_is_refused(planned, capsys):
    fold = planned / "results" / NAME / "DiffusionSegmentationTrainer__nnUNetPlans__2d_diffusion" / "fold_0"
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(fold)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        outcome = run_cli(TRAIN, planned, capsys)
        assert f"PID {process.pid}" in outcome.message and "fold_0" in outcome.message
    finally:
        process.kill()
        process.wait()


def test_plan_into_a_held_preprocessed_folder_is_refused(planned, capsys):
    folder = planned / "preprocessed" / NAME
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        outcome = run_cli([*PLAN, "--overwrite"], planned, capsys)
        assert f"PID {process.pid}" in outcome.message and NAME in outcome.message
    finally:
        process.kill()
        process.wait()


# ---------------------------------------------------------------------- (d) ensemble into one of its inputs
@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_ensemble_into_one_of_its_inputs_is_refused(world, capsys, where):
    _, prediction = _evaluation_folders(world)
    other = world / "pred2"
    shutil.copytree(prediction, other)
    output = {"same": other, "inside": other / "ensemble", "around": world}[where]
    outcome = run_cli(["ensemble", "-i", str(prediction), str(other), "-o", str(output), "--overwrite"], world,
                      capsys)
    assert str(output) in outcome.message and "input folder" in outcome.message and "-o" in outcome.message


def test_snapshot_sees_a_changed_file(tmp_path):
    """The helper the cases above rely on notices a rewritten file (so 'nothing changed' can fail)."""
    (tmp_path / "a").write_text("1")
    before = snapshot(tmp_path)
    time.sleep(0.01)
    (tmp_path / "a").write_text("22")
    assert snapshot(tmp_path) != before
