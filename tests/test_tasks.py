"""The task classes: what each task reads from dataset.json, and what the rest of the package asks of it."""

import pytest

from spinediff.diffusion.settings import DiffusionSettings
from spinediff.errors import SpineDiffError
from spinediff.tasks import TASKS, Generation, Segmentation, Translation, get_task, task_spec


def test_a_dataset_without_a_spinediff_block_is_segmentation_over_every_channel():
    spec = task_spec({"channel_names": {"0": "T1w", "1": "T2w"}})
    assert isinstance(spec.task, Segmentation) and spec.source_channels == (0, 1) and spec.target_channels == ()


def test_generation_targets_every_image_channel_unless_told_otherwise():
    spec = task_spec({"channel_names": {"0": "CT", "1": "MR"}, "spinediff": {"task": "generation"}})
    assert isinstance(spec.task, Generation) and spec.target_channels == (0, 1) and spec.source_channels == ()


def test_an_unknown_task_names_the_file_and_the_choices():
    with pytest.raises(SpineDiffError, match=r"my/dataset.json: spinediff.task is 'denoise'.*segmentation"):
        task_spec({"channel_names": {"0": "CT"}, "spinediff": {"task": "denoise"}}, "my/dataset.json")


def test_each_task_wires_the_network_channels_its_own_way():
    # (source image channels, target image channels, label channels) = (2, 1, 4)
    assert Segmentation().network_channels(2, 1, 4) == (2, 4)
    assert Translation().network_channels(2, 1, 4) == (2, 1)
    assert Generation().network_channels(2, 1, 4) == (4, 1)


def test_the_plans_name_resolves_to_the_same_task_object():
    settings = DiffusionSettings(task="translation", condition_channels=2, target_channels=1, loss="l1")
    assert settings.task_type is TASKS["translation"] and get_task(settings.task_type) is settings.task_type
    assert settings.task_type.has_downstream_dice and not settings.task_type.writes_labels


def test_block_problems_are_the_tasks_own():
    assert Translation().block_problems([0], [], {}) and not Translation().block_problems([0], [1], {})
    assert Generation().block_problems([0], [], {"source_channels": [0]})
    assert not Segmentation().block_problems([0], [], {})


def test_a_trainer_is_found_by_its_class_name_without_registration():
    from spinediff.training.diffusion_trainers import DiffusionSegmentationTrainer
    from spinediff.training.registry import find_trainer, trainer_classes

    assert find_trainer("DiffusionSegmentationTrainer") is DiffusionSegmentationTrainer
    assert {"RegressionTrainer", "Pix2PixTrainer", "SegGuidedGenerationTrainer"} <= set(trainer_classes())
    with pytest.raises(SpineDiffError, match="'nnUNetTrainer' is not a spinediff trainer"):
        find_trainer("nnUNetTrainer")
