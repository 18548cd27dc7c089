"""nnU-Net's worker pools in this process with one worker (spinediff.utilities.in_process): nothing is spawned,
and the answers are those of nnunetv2's own pools."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from spinediff.utilities import in_process


def _write(array: np.ndarray, path) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(image, str(path))


_GET_CONTEXT = multiprocessing.get_context


def _no_spawn(method=None):
    if method == "spawn":
        raise AssertionError("a process pool was started")
    return _GET_CONTEXT(method)  # a thread pool asks for the default context


def test_metrics_run_in_this_process_and_match(tmp_path, monkeypatch):
    """compute_metrics_on_folder under metrics_in_process gives nnU-Net's Dice without starting a pool; without it,
    nnunetv2 starts one (the guard below is reached)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    reference = np.zeros((4, 10, 10), np.uint8)
    reference[1:3, 2:8, 2:8] = 1
    prediction = np.zeros_like(reference)
    prediction[1:3, 2:8, 2:6] = 1  # 48 of the reference's 72 voxels: Dice 2*48/(72+48) = 0.8
    _write(reference, tmp_path / "ref" / "c1.nii.gz")
    _write(prediction, tmp_path / "pred" / "c1.nii.gz")
    monkeypatch.setattr(multiprocessing, "get_context", _no_spawn)

    def score():
        return compute_metrics_on_folder(str(tmp_path / "ref"), str(tmp_path / "pred"), str(tmp_path / "s.json"),
                                         SimpleITKIO(), ".nii.gz", [1], None, num_processes=1)

    with in_process.metrics_in_process():
        summary = score()
    assert summary["mean"][1]["Dice"] == pytest.approx(0.8)
    with pytest.raises(AssertionError, match="pool was started"):
        score()  # nnunetv2 alone spawns a pool even for one process
    with pytest.raises(AssertionError, match="pool was started"), in_process.metrics_in_process(enabled=False):
        score()


def test_one_worker_follows_nnunets_worker_count(monkeypatch):
    import nnunetv2.configuration

    monkeypatch.setattr(nnunetv2.configuration, "default_num_processes", 1)
    assert in_process.nnunet_one_worker()
    monkeypatch.setattr(nnunetv2.configuration, "default_num_processes", 8)
    assert not in_process.nnunet_one_worker()


class _Predictor:
    def __init__(self) -> None:
        self.calls = []

    def predict_from_files_sequential(self, inputs, output, save_probabilities, overwrite):
        assert Path(output).is_dir()  # nnunetv2's sequential path writes into it without making it
        print("perform_everything_on_device: False")  # as nnunetv2 does for every case
        self.calls.append(("sequential", inputs, output, save_probabilities, overwrite))

    def predict_from_files(self, inputs, output, save_probabilities, overwrite, num_processes_preprocessing,
                           num_processes_segmentation_export):
        self.calls.append(("workers", num_processes_preprocessing, num_processes_segmentation_export))


def test_prediction_is_sequential_with_one_worker_only(monkeypatch, tmp_path, capsys):
    import nnunetv2.configuration

    predictor = _Predictor()
    out = str(tmp_path / "out")
    monkeypatch.setattr(nnunetv2.configuration, "default_num_processes", 1)
    in_process.predict_nnunet_files(predictor, "in", out, save_probabilities=True)
    assert capsys.readouterr().out == ""  # nnunetv2's line per case is not shown
    monkeypatch.setattr(nnunetv2.configuration, "default_num_processes", 4)
    in_process.predict_nnunet_files(predictor, "in", out, save_probabilities=False)
    assert predictor.calls == [("sequential", "in", out, True, True), ("workers", 1, 1)]


def test_nnunet_validation_runs_its_pools_here_with_one_worker_and_restores_them(monkeypatch):
    import nnunetv2.configuration
    from nnunetv2.evaluation import evaluate_predictions
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    seen = []

    class Trainer:
        def perform_actual_validation(self, save_probabilities):
            seen.append((trainer_module.multiprocessing is multiprocessing,
                         evaluate_predictions.multiprocessing is multiprocessing, save_probabilities))

    monkeypatch.setattr(nnunetv2.configuration, "default_num_processes", 1)
    in_process.nnunet_validation(Trainer(), True)
    monkeypatch.setattr(nnunetv2.configuration, "default_num_processes", 8)
    in_process.nnunet_validation(Trainer(), False)
    assert seen == [(False, False, True), (True, True, False)]
    assert trainer_module.multiprocessing is multiprocessing and evaluate_predictions.multiprocessing is multiprocessing


def test_file_lists_of_a_dataset_without_a_fork(tmp_path, monkeypatch):
    """get_filenames_of_train_images_and_targets (nnunetv2) under file_lists_in_process: the same lists, no
    process forked (nnunetv2 alone forks a pool for the name match)."""
    import os

    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for case in ("a_001", "a_002"):
        for channel in (0, 1):
            (tmp_path / "imagesTr" / f"{case}_{channel:04d}.nii.gz").touch()
    (tmp_path / "imagesTr" / "a_001_0000.nii.gz.bak").touch()  # not a case file
    dataset_json = {"file_ending": ".nii.gz"}
    expected = {case: {"images": [str(tmp_path / "imagesTr" / f"{case}_{c:04d}.nii.gz") for c in (0, 1)],
                       "label": str(tmp_path / "labelsTr" / f"{case}.nii.gz")} for case in ("a_001", "a_002")}

    def no_fork():
        raise AssertionError("forked")

    monkeypatch.setattr(os, "fork", no_fork)
    with in_process.file_lists_in_process():
        assert get_filenames_of_train_images_and_targets(str(tmp_path), dict(dataset_json)) == expected
    with pytest.raises(AssertionError, match="forked"):
        get_filenames_of_train_images_and_targets(str(tmp_path), dict(dataset_json))
