"""The one plans reader (spinediff.planning.plans): inheritance, typed blocks, derived prediction types."""

from __future__ import annotations

import json

import pytest

from spinediff.errors import SpineDiffError
from spinediff.planning.plans import SpineDiffPlans, derived_configurations

ARCHITECTURE = {"network_class_name": "spinediff.networks.time_unet.TimeConditionedUNet", "arch_kwargs": {},
                "_kw_requires_import": []}
DIFFUSION = {"task": "translation", "condition_channels": 2, "target_channels": 1, "prediction_type": "sample",
             "num_samples": 5,
             "target_intensity": {"channels": [2], "normalization": "NoNormalization",
                                  "per_channel": [{"name": "CT", "units": "HU",
                                                   "source_points": [-1000.0, 0.0, 1500.0],
                                                   "network_points": [-1.0, 0.0, 1.0]}]}}


def _plans(derived: bool = True) -> dict:
    configurations = {
        "2d_diffusion": {"data_identifier": "x", "patch_size": [32, 32], "spacing": [1.0, 1.0], "batch_size": 4,
                         "architecture": ARCHITECTURE,
                         "diffusion": DIFFUSION, "schedule": {"epochs": 3, "iterations_per_epoch": 4}},
        "2d_diffusion_fast": {"inherits_from": "2d_diffusion", "patch_size": [16, 16]},
        "2d": {"data_identifier": "y", "patch_size": [32, 32], "spacing": [1.0, 1.0], "batch_size": 4,
               "architecture": ARCHITECTURE},
    }
    if derived:
        configurations.update(derived_configurations(configurations))
    return {"dataset_name": "Dataset001_Test", "plans_name": "nnUNetPlans", "configurations": configurations}


def test_configurations_resolve_inheritance_and_type_their_blocks() -> None:
    plans = SpineDiffPlans(_plans())
    fast = plans.configuration("2d_diffusion_fast")
    assert fast.configuration["patch_size"] == [16, 16] and fast.manager.patch_size == [16, 16]
    assert fast.diffusion.num_samples == 5 and fast.schedule == {"epochs": 3, "iterations_per_epoch": 4}
    assert fast.target_intensity.mappings[0].clip_range == (-1000.0, 1500.0)
    plain = plans.configuration("2d")
    assert not plain.is_diffusion and plain.target_intensity is None and plain.schedule is None
    with pytest.raises(SpineDiffError, match="no diffusion block"):
        _ = plain.diffusion
    with pytest.raises(SpineDiffError, match="no configuration '3d_diffusion'; available: 2d_diffusion, "):
        plans.configuration("3d_diffusion")


def test_other_prediction_types_are_planned_once_per_diffusion_configuration() -> None:
    plans = SpineDiffPlans(_plans())
    assert plans.planned_names == ["2d_diffusion", "2d_diffusion_fast", "2d"]
    assert set(plans.names) - set(plans.planned_names) == {
        "2d_diffusion_eps", "2d_diffusion_v", "2d_diffusion_fast_eps", "2d_diffusion_fast_v", "2d_diffusion_rflow",
        "2d_diffusion_fast_rflow"}
    flow = plans.configuration("2d_diffusion_rflow").diffusion  # rectified flow: same network and target
    assert (flow.noise_schedule, flow.solver, flow.prediction_type) == ("rflow", "euler", "sample")
    eps = plans.configuration(plans.for_prediction_type("2d_diffusion_fast", "noise"))
    assert eps.name == "2d_diffusion_fast_eps" and eps.is_derived
    assert eps.diffusion.prediction_type == "epsilon" and eps.configuration["patch_size"] == [16, 16]
    assert plans.for_prediction_type("2d_diffusion", "image") == "2d_diffusion"
    assert plans.for_prediction_type("2d_diffusion", None) == "2d_diffusion"
    # derived configurations are not derived again, and a second pass adds nothing new
    assert derived_configurations(plans.plans["configurations"]).keys() == set(plans.names) - set(plans.planned_names)


def test_plans_made_before_derived_configurations_ask_for_a_new_plan(tmp_path) -> None:
    path = tmp_path / "nnUNetPlans.json"
    path.write_text(json.dumps(_plans(derived=False)))
    plans = SpineDiffPlans.read(path)
    with pytest.raises(SpineDiffError, match="re-run `spinediff plan`"):
        plans.for_prediction_type("2d_diffusion", "eps")
    with pytest.raises(SpineDiffError, match="x0 \\(image mode\\), eps"):
        plans.for_prediction_type("2d_diffusion", "banana")
    with pytest.raises(SpineDiffError, match="run `spinediff plan` first"):
        SpineDiffPlans.read(tmp_path / "missing.json")
