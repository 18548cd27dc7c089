"""Time budgets: parsing, field-of-view-first planning, the refitted schedule, and a 1-minute training that
ends on time with its learning rate annealed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_planning import write_dataset

from spinediff.diffusion.process import DiffusionProcess
from spinediff.diffusion.settings import DiffusionSettings
from spinediff.errors import SpineDiffError
from spinediff.planning.api import plan_dataset
from spinediff.planning.budget import (
    MIN_PLAN_BUDGET_SECONDS,
    TARGET_STEPS,
    coarser_spacing,
    parse_budget,
    required_field_of_view,
    schedule_for_budget,
)
from spinediff.training.schedule import refit_epochs

BUDGET = MIN_PLAN_BUDGET_SECONDS  # seconds: the training budget of the acceptance test below


def test_budget_parsing():
    assert parse_budget("90s") == 90
    assert parse_budget("15m") == 900
    assert parse_budget("1.5h") == 5400
    assert parse_budget("20") == 1200  # minutes
    assert parse_budget(2) == 120
    for bad in ("fast", "10 parsecs", "-5m", "0m"):
        with pytest.raises(SpineDiffError, match="budget"):
            parse_budget(bad)


def test_schedule_fills_the_budget_and_caps_at_nnunets():
    schedule = schedule_for_budget(900, 0.4)
    assert schedule.iterations_per_epoch == 50
    assert 0.9 * 900 <= schedule.expected_seconds <= 900
    long = schedule_for_budget(12 * 3600, 0.05, device="cuda")
    assert long.iterations_per_epoch == 250 and long.steps <= 250_000


def test_refit_keeps_plan_within_tolerance_and_refits_outside():
    # on plan: 10 epochs of 10 s for a 100 s budget
    assert refit_epochs(2, 10, 20.0, 10.0, 100.0) == 10
    # twice as slow: 20 s per epoch, 40 s spent after 2 epochs -> 3 more epochs end at 100 s
    assert refit_epochs(2, 10, 40.0, 20.0, 100.0) == 5
    # twice as fast: 5 s per epoch -> 18 more epochs
    assert refit_epochs(2, 10, 10.0, 5.0, 100.0) == 20
    # a cap never grows
    assert refit_epochs(2, 10, 10.0, 5.0, 100.0, grow=False) == 10
    # past the budget with epochs left: one more, which runs at the end of the rescaled learning-rate schedule
    assert refit_epochs(6, 10, 150.0, 20.0, 100.0) == 7
    assert refit_epochs(6, 10, 95.0, 20.0, 100.0) == 7  # a quarter epoch left rounds to none: still one more
    assert refit_epochs(6, 6, 150.0, 20.0, 100.0) == 6  # the plan is done: nothing is added


def test_field_of_view_and_lowres_rule():
    fov = required_field_of_view(np.array([100.0, 40.0]), np.array([224.0, 224.0]))
    assert np.allclose(fov, [150.0, 60.0])
    assert np.allclose(required_field_of_view(np.array([200.0, 40.0]), np.array([224.0, 224.0])), [224.0, 60.0])
    # the finest axes are coarsened first, as nnU-Net's 3d_lowres does
    assert np.allclose(coarser_spacing(np.array([3.0, 0.5, 0.5]), 2.0), [3.0, 1.0, 1.0])
    assert np.allclose(coarser_spacing(np.array([1.0, 1.0]), 2.0), [2.0, 2.0])


def test_timestep_power_favours_noisy_levels():
    generator = torch.Generator().manual_seed(0)
    uniform = DiffusionProcess(timestep_power=1.0).sample_timesteps(20000, generator)
    skewed = DiffusionProcess(timestep_power=3.0).sample_timesteps(20000, generator)
    assert 0 <= int(skewed.min()) and int(skewed.max()) <= 999
    assert abs(float((uniform >= 900).float().mean()) - 0.1) < 0.02
    assert abs(float((skewed >= 900).float().mean()) - (1 - 0.9 ** (1 / 3))) > 0.2  # 46 % vs 10 %
    assert float((skewed >= 900).float().mean()) > 0.4
    with pytest.raises(SpineDiffError, match="timestep_power"):
        DiffusionSettings(task="segmentation", condition_channels=1, target_channels=2, loss="dice_ce",
                          timestep_power=0.0)


@pytest.fixture(scope="module")
def wide_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    # 1 mm slices of 192 x 192 whose label blob spans half of each axis
    write_dataset(root / "raw", "Dataset995_Wide", shape_xyz=(192, 192, 12), spacing=(1.0, 1.0, 1.0), cases=3)
    return root


def _plan(root: Path, budget: str, tag: str) -> dict:
    pre = root / f"pre_{tag}"
    plans_file = plan_dataset(995, device="cpu", preprocess=False, num_processes=1, raw_folder=root / "raw",
                              preprocessed_folder=pre, show_progress_bar=False, intensity_samples=100_000,
                              budget=budget, measure=False)
    return json.loads(Path(plans_file).read_text())


def test_small_budget_trades_resolution_for_field_of_view(wide_dataset):
    small = _plan(wide_dataset, "40s", "small")["configurations"]
    large = _plan(wide_dataset, "10h", "large")["configurations"]
    for configuration in (small["2d_diffusion"], small["2d_cpu"]):
        planning = configuration["planning"]
        # the foreground extent is measured from the labels (half of 192 mm along the in-plane axes)
        assert planning["foreground_extent_mm"] == pytest.approx([96, 96], abs=3)
        assert planning["spacing_factor"] > 1
        assert all(c == 1.0 for c in planning["foreground_coverage"])
        assert configuration["spacing"][0] > 1.0 and configuration["data_identifier"].endswith("mm")
    assert small["2d_diffusion"]["data_identifier"] == small["2d_cpu"]["data_identifier"]
    assert large["2d_diffusion"]["planning"]["spacing_factor"] == 1.0
    assert "spacing" not in large["2d_diffusion"]  # nnU-Net's own spacing and preprocessed data
    # the schedule fills the budget with the estimated step time
    schedule = small["2d_diffusion"]["schedule"]
    assert schedule["budget_seconds"] == 40
    assert schedule["steps"] * schedule["step_seconds"] <= 40
    assert large["2d_diffusion"]["schedule"]["steps"] >= TARGET_STEPS


@pytest.mark.slow
def test_half_minute_budget_trains_about_that_long_and_anneals(phantom_root, tmp_path, monkeypatch):
    """The acceptance test of the budget issue (there for 1 minute; here for the shortest budget the planner takes,
    MIN_PLAN_BUDGET_SECONDS, to keep the suite short): plan a phantom for it, train, check time and learning
    rate."""
    from spinediff.training.api import TrainingOptions, build_trainer, configure_schedule, run_and_log_schedule

    for key, value in (("nnUNet_raw", phantom_root), ("nnUNet_preprocessed", tmp_path / "pre"),
                       ("nnUNet_results", tmp_path / "res")):
        monkeypatch.setenv(key, str(value))  # restored after the test
    plans_file = plan_dataset(901, configurations=["2d_diffusion"], device="cpu", num_processes=1,
                              show_progress_bar=False, budget=f"{BUDGET:g}s")
    schedule = json.loads(Path(plans_file).read_text())["configurations"]["2d_diffusion"]["schedule"]
    assert schedule["step_seconds_source"] == "measured" and schedule["budget_seconds"] == BUDGET
    trainer = build_trainer(901, "2d_diffusion", 0, "DiffusionSegmentationTrainer")
    budget, grow = configure_schedule(trainer, TrainingOptions())
    assert budget == BUDGET and grow and trainer.num_epochs == schedule["epochs"]
    lines = []
    start = time.perf_counter()
    log = run_and_log_schedule(trainer, budget, grow, lines.append)
    elapsed = time.perf_counter() - start
    assert 0.75 * BUDGET <= elapsed <= 1.25 * BUDGET, (elapsed, log.refits)
    assert trainer.current_epoch == trainer.num_epochs  # the schedule ran to its (refitted) end
    lrs = trainer.logger.get_checkpoint()["lrs"]
    assert len(lrs) == trainer.num_epochs
    # poly decay: the last epoch's learning rate is the end of the schedule, init * (1 / epochs) ** 0.9
    assert lrs[-1] == pytest.approx(trainer.initial_lr * (1 / trainer.num_epochs) ** 0.9, rel=1e-3)
    assert lrs[-1] < 0.25 * lrs[0]
    saved = json.loads((Path(trainer.output_folder) / "schedule_log.json").read_text())
    assert saved["epochs_run"] == trainer.num_epochs
    # one console line per epoch, with the validation metric by its name and an ETA that reaches 0
    assert len(lines) == trainer.num_epochs
    assert lines[0].startswith("epoch 1/") and "val Dice" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith(f"epoch {trainer.num_epochs}/{trainer.num_epochs}") and "ETA 0.0 min" in lines[-1]


def test_ordered_labels_are_found_and_keep_their_order_in_augmentation():
    from types import SimpleNamespace

    from spinediff.planning.label_order import augmentation_block, ordered_axes
    from spinediff.training.augmentation import apply_planned_augmentation

    rng = np.random.default_rng(0)
    # five levels stacked 30 mm apart along axis 1, jittered along axes 0 and 2
    cases = [{level: np.array([rng.normal(40, 3), 30.0 * level + rng.normal(0, 2), rng.normal(100, 3)])
              for level in range(1, 6)} for _ in range(6)]
    assert ordered_axes(cases, 3) == [1]
    shuffled = [{level: c[level][[1, 0, 2]] for level in c} for c in cases]  # the same stack along axis 0
    assert ordered_axes(shuffled, 3) == [0]
    assert ordered_axes([{1: np.zeros(3)}], 3) == []  # one label: no order to keep
    # a 2D configuration's patch axes are the last two after the transpose
    assert augmentation_block([1], [0, 1, 2], 2) == {"ordered_label_axes": [0], "mirror_axes": [1],
                                                       "max_rotation_degrees": 15.0}
    assert augmentation_block([1], [1, 0, 2], 2)["ordered_label_axes"] == []  # axis 1 became the slice axis
    assert augmentation_block([1], [0, 1, 2], 3)["mirror_axes"] == [0, 2]

    logged = []
    trainer = SimpleNamespace(
        configuration_manager=SimpleNamespace(configuration={"augmentation": augmentation_block([1], [0, 1, 2], 2)},
                                              patch_size=[64, 48]),
        print_to_log_file=logged.append,
        configure_rotation_dummyDA_mirroring_and_inital_patch_size=lambda: ((-np.pi, np.pi), False, [90, 90], (0, 1)))
    apply_planned_augmentation(trainer)
    rotation, _, initial, mirror = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert mirror == (1,) and trainer.inference_allowed_mirroring_axes == (1,)
    assert rotation == pytest.approx((-np.radians(15), np.radians(15)))
    assert initial[0] < 90 and logged
    # no axis left to mirror: nnU-Net's predictor wants None, not an empty tuple
    trainer.configuration_manager.configuration["augmentation"] = augmentation_block([1, 2], [0, 1, 2], 2)
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size = (
        lambda: ((-np.pi, np.pi), False, [90, 90], (0, 1)))
    apply_planned_augmentation(trainer)
    assert trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3] == ()
    assert trainer.inference_allowed_mirroring_axes is None
