"""`spinediff plan`: planner responses, plans contract and round trip, target mapping, preprocessing, CLI.

Tiny raw datasets are written here (random volumes with a label blob) so that these tests depend on
nothing but nnunetv2 and the network module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from spinediff.cli import main
from spinediff.errors import SpineDiffError
from spinediff.planning.api import nnunet_environment, plan_dataset
from spinediff.planning.memory import Budget, analytic_cost, device_profile, estimate_cost
from spinediff.planning.planner import SpineDiffPlanner
from spinediff.planning.target_intensity import (
    ChannelIntensityMapping,
    TargetIntensity,
    mapping_from_statistics,
)

CONTRACT_ARCH_KEYS = {"n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_conv_per_stage",
                      "n_conv_per_stage_decoder", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op",
                      "dropout_op_kwargs", "nonlin", "nonlin_kwargs", "time_embedding_dim", "attention_stages"}


def write_dataset(root: Path, folder: str, shape_xyz=(40, 40, 40), spacing=(1.0, 1.0, 1.0),
                  channels=("MRI",), task=None, cases=4, seed=0) -> Path:
    """Random volumes with an ellipsoid label blob; a channel named CT gets HU-like values."""
    rng = np.random.default_rng(seed)
    dataset = root / folder
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir()
    zyx = np.indices(shape_xyz[::-1]).astype(float)
    centre = np.array(shape_xyz[::-1])[:, None, None, None] / 2
    blob = (((zyx - centre) / (centre / 2)) ** 2).sum(0) < 1
    for case in range(cases):
        for index, name in enumerate(channels):
            if name == "CT":
                image = np.where(blob, 700.0, np.where(rng.random(blob.shape) > 0.3, 40.0, -1000.0))
                image += rng.normal(0, 15, blob.shape)
            else:
                image = rng.normal(100, 20, blob.shape) + 50 * blob
            itk = sitk.GetImageFromArray(image.astype(np.float32))
            itk.SetSpacing(spacing)
            sitk.WriteImage(itk, str(dataset / "imagesTr" / f"case{case:03d}_{index:04d}.nii.gz"))
        label = sitk.GetImageFromArray(blob.astype(np.uint8))
        label.SetSpacing(spacing)
        sitk.WriteImage(label, str(dataset / "labelsTr" / f"case{case:03d}.nii.gz"))
    dataset_json = {"channel_names": {str(i): c for i, c in enumerate(channels)},
                    "labels": {"background": 0, "blob": 1}, "numTraining": cases, "file_ending": ".nii.gz"}
    if task:
        dataset_json["spinediff"] = task
    (dataset / "dataset.json").write_text(json.dumps(dataset_json))
    return dataset


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """Four tiny datasets, fingerprinted and planned for the CPU (the translation one also preprocessed)."""
    root = tmp_path_factory.mktemp("planning")
    raw, pre = root / "raw", root / "preprocessed"
    write_dataset(raw, "Dataset991_Iso")
    write_dataset(raw, "Dataset992_Aniso", shape_xyz=(40, 40, 12), spacing=(0.8, 0.8, 3.5))
    write_dataset(raw, "Dataset993_Trans", channels=("T1w", "T2w", "CT"),
                  task={"task": "translation", "source_channels": [0, 1], "target_channels": [2]})
    write_dataset(raw, "Dataset994_FourChannels", channels=("T1w", "T2w", "FLAIR", "T1c"))
    plans = {}
    for dataset_id in (991, 992, 994):
        plans[dataset_id] = plan_dataset(dataset_id, device="cpu", preprocess=False, num_processes=1,
                                         raw_folder=raw, preprocessed_folder=pre, show_progress_bar=False,
                                         intensity_samples=100_000)
    plans[993] = plan_dataset(993, configurations=["2d_diffusion"], device="cpu", num_processes=1,
                              raw_folder=raw, preprocessed_folder=pre, show_progress_bar=False,
                              intensity_samples=100_000)
    return {"raw": raw, "pre": pre, "plans": plans, "root": root, "replans": {}}


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def replan(planned, name: str, device: str, memory_target_gb: float | None = None, scale: float = 1.0) -> dict:
    """Plan again from a copy of the fingerprint, image shapes scaled by ``scale`` (a larger dataset)."""
    key = (name, device, memory_target_gb, scale)
    if key in planned["replans"]:
        return planned["replans"][key]
    pre = planned["root"] / f"replan_{name}_{device}_{memory_target_gb}_{scale}"
    (pre / name).mkdir(parents=True)
    fingerprint = load(planned["pre"] / name / "dataset_fingerprint.json")
    fingerprint["shapes_after_crop"] = [[int(s * scale) for s in shape] for shape in fingerprint["shapes_after_crop"]]
    (pre / name / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    statistics = planned["pre"] / name / "spinediff_fingerprint.json"
    with nnunet_environment(planned["raw"], pre):
        planner = SpineDiffPlanner(name, device=device, memory_target_gb=memory_target_gb,
                                   target_statistics=load(statistics) if statistics.exists() else None)
        planned["replans"][key] = planner.plan_experiment()
    return planned["replans"][key]


def voxels_per_step(configuration: dict) -> int:
    return int(np.prod(configuration["patch_size"])) * configuration["batch_size"]


# ----------------------------------------------------------------------------- planner responses
def test_anisotropic_spacing_gets_inplane_kernels_and_2d(planned):
    iso = load(planned["plans"][991])
    aniso = load(planned["plans"][992])
    iso_kwargs = iso["configurations"]["3d_diffusion"]["architecture"]["arch_kwargs"]
    aniso_kwargs = aniso["configurations"]["3d_diffusion"]["architecture"]["arch_kwargs"]
    assert all(k == [3, 3, 3] for k in iso_kwargs["kernel_sizes"])
    assert all(s[0] == s[1] == s[2] for s in iso_kwargs["strides"])
    # the coarse 3.5 mm axis comes first after transpose; no convolution or pooling along it at first
    assert aniso["configurations"]["3d_fullres"]["spacing"][0] == pytest.approx(3.5)
    assert aniso_kwargs["kernel_sizes"][0] == [1, 3, 3] and aniso_kwargs["strides"][1] == [1, 2, 2]
    assert aniso["spinediff"]["recommended_configuration"] == "2d_diffusion"
    assert any("anisotropic" in note for note in aniso["configurations"]["3d_diffusion"]["notes"])
    assert aniso["configurations"]["2d_diffusion"]["patch_size"] == [40, 40]  # the fine plane
    iso_cuda = replan(planned, "Dataset991_Iso", "cuda", 8)
    assert iso_cuda["spinediff"]["recommended_configuration"] == "3d_diffusion"


def test_memory_target_and_device_change_patch_or_batch(planned):
    name = "Dataset991_Iso"
    cpu = replan(planned, name, "cpu", scale=6)["configurations"]
    small = replan(planned, name, "cuda", 8, scale=6)["configurations"]
    large = replan(planned, name, "cuda", 40, scale=6)["configurations"]
    for config in ("2d_diffusion", "3d_diffusion"):
        assert voxels_per_step(cpu[config]) < voxels_per_step(small[config]) <= voxels_per_step(large[config])
    assert voxels_per_step(small["3d_diffusion"]) < voxels_per_step(large["3d_diffusion"])
    assert np.prod(large["3d_diffusion"]["patch_size"]) > np.prod(small["3d_diffusion"]["patch_size"])
    # cpu: small widths and an estimated step within the budget; cuda: nnU-Net's widths
    cpu_kwargs = cpu["2d_diffusion"]["architecture"]["arch_kwargs"]
    assert cpu_kwargs["features_per_stage"][0] == 16 and max(cpu_kwargs["features_per_stage"]) <= 128
    assert cpu["2d_diffusion"]["planning"]["estimated_step_seconds_cpu"] <= 0.3
    assert max(small["2d_diffusion"]["architecture"]["arch_kwargs"]["features_per_stage"]) == 512
    assert cpu["2d_cpu"]["patch_size"] == cpu["2d_diffusion"]["patch_size"]
    assert "2d_cpu" not in small
    # nnU-Net makes a 3d_lowres for these large images; it is kept, the diffusion 3D builds on 3d_fullres
    lowres = replan(planned, name, "cuda", 8, scale=12)["configurations"]
    assert "3d_lowres" in lowres and lowres["3d_diffusion"]["inherits_from"] == "3d_fullres"


def test_image_size_changes_patch(planned):
    small = load(planned["plans"][991])["configurations"]
    large = replan(planned, "Dataset991_Iso", "cpu", scale=6)["configurations"]
    assert small["3d_diffusion"]["patch_size"] == [40, 40, 40]  # the whole (tiny) image
    assert large["3d_diffusion"]["patch_size"] != [40, 40, 40]
    assert large["2d_diffusion"]["patch_size"][0] > 40
    assert large["2d_diffusion"]["planning"]["patch_reductions"] > 0  # had to shrink to fit the budget


def test_channel_count_reaches_network_and_budget(planned):
    one = load(planned["plans"][991])["configurations"]["2d_diffusion"]
    four = load(planned["plans"][994])["configurations"]["2d_diffusion"]
    translation = load(planned["plans"][993])
    assert (one["diffusion"]["condition_channels"], one["diffusion"]["target_channels"]) == (1, 2)
    assert (four["diffusion"]["condition_channels"], four["diffusion"]["target_channels"]) == (4, 2)
    t = translation["configurations"]["2d_diffusion"]["diffusion"]
    assert (t["task"], t["condition_channels"], t["target_channels"]) == ("translation", 2, 1)
    assert translation["configurations"]["2d"]["normalization_schemes"][2] == "NoNormalization"
    kwargs, patch = one["architecture"]["arch_kwargs"], tuple(one["patch_size"])
    more, fewer = estimate_cost(patch, kwargs, 6, 2), estimate_cost(patch, kwargs, 3, 2)
    assert more.feature_map_elements > fewer.feature_map_elements
    assert analytic_cost(patch, kwargs, 6, 2).step_seconds(4) > analytic_cost(patch, kwargs, 3, 2).step_seconds(4)
    big_one = replan(planned, "Dataset991_Iso", "cpu", scale=6)["configurations"]["2d_diffusion"]
    big_four = replan(planned, "Dataset994_FourChannels", "cpu", scale=6)["configurations"]["2d_diffusion"]
    assert voxels_per_step(big_four) <= voxels_per_step(big_one)


def test_nnunet_configurations_are_nnunets(planned, monkeypatch):
    """2d / 3d_fullres are exactly what nnU-Net's own planner writes from the same fingerprint."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")  # nnU-Net's estimate calls torch.set_num_threads with it
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    ours = load(planned["plans"][991])["configurations"]
    with nnunet_environment(planned["raw"], planned["pre"]):
        theirs = ExperimentPlanner("Dataset991_Iso", plans_name="nnUNetDefaultForTest").plan_experiment()
    theirs = json.loads(json.dumps(theirs, default=lambda o: o.tolist() if hasattr(o, "tolist") else o))
    for config in ("2d", "3d_fullres"):
        for key in ("patch_size", "batch_size", "spacing", "architecture", "normalization_schemes"):
            assert json.dumps(ours[config][key]) == json.dumps(theirs["configurations"][config][key]), (config, key)


# ----------------------------------------------------------------------------- plans contract
def test_plans_round_trip_through_plans_manager_and_build_networks(planned):
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from spinediff.planning.plans import SpineDiffPlans

    plans_file = planned["plans"][993]
    manager = PlansManager(str(plans_file))
    assert manager.plans == load(plans_file)
    assert {"2d", "3d_fullres", "2d_diffusion", "3d_diffusion", "2d_cpu"} <= set(manager.available_configurations)
    for name, base in (("2d_diffusion", "2d"), ("3d_diffusion", "3d_fullres")):
        configuration = manager.get_configuration(name)
        assert configuration.data_identifier == manager.get_configuration(base).data_identifier
        assert configuration.spacing == manager.get_configuration(base).spacing
        arch = configuration.configuration["architecture"]
        assert arch["network_class_name"] == "spinediff.networks.time_unet.TimeConditionedUNet"
        assert set(arch["arch_kwargs"]) == CONTRACT_ARCH_KEYS
        assert arch["arch_kwargs"]["norm_op"] == "spinediff.networks.blocks.GroupNorm"
        settings_ = SpineDiffPlans(manager.plans).configuration(name).diffusion
        assert settings_.prediction_type == "sample" and settings_.loss == "l1"
        network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                         settings_.input_channels, settings_.output_channels)
        patch = [min(p, 16) for p in configuration.patch_size]
        x = torch.zeros(1, settings_.input_channels, *patch)
        assert network(x, torch.tensor([10])).shape == (1, settings_.output_channels, *patch)
    baseline = manager.get_configuration("2d_cpu").configuration["architecture"]
    assert baseline["network_class_name"].endswith("PlainConvUNet")


def test_preprocessing_keeps_target_in_hu_and_mapping_inverts(planned):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = planned["pre"] / "Dataset993_Trans"
    assert (folder / "gt_segmentations" / "case000.nii.gz").exists()
    assert not (folder / "nnUNetPlans_3d_fullres").exists()  # only the requested configuration's data
    data_folder = str(folder / "nnUNetPlans_2d")
    data, *_ = infer_dataset_class(data_folder)(data_folder).load_case("case000")
    data = np.asarray(data)
    assert abs(float(data[0].mean())) < 0.5  # MR channel z-scored by nnU-Net
    assert data[2].min() < -900 and data[2].max() > 600  # CT still in HU
    block = load(planned["plans"][993])["configurations"]["2d_diffusion"]["diffusion"]["target_intensity"]
    mapping = TargetIntensity.from_dict(block)
    network = mapping.to_network(data[2:3])
    assert network.min() >= -1 and network.max() <= 1
    lo, hi = mapping.mappings[0].clip_range
    inside = np.clip(data[2:3], lo, hi)
    assert np.abs(mapping.from_network(network) - inside).max() < 1.0


def test_target_statistics_are_the_same_for_the_same_seed(planned):
    """The foreground sample reads the label map itself, never a view into an image already freed (that gave
    different statistics, hence different plans and models, on every run)."""
    from spinediff.planning.target_intensity import collect_target_statistics
    from spinediff.tasks import task_spec

    raw = planned["raw"] / "Dataset993_Trans"
    dataset_json = json.loads((raw / "dataset.json").read_text())
    runs = [collect_target_statistics(raw, dataset_json, task_spec(dataset_json), samples_per_case=5000,
                                      show_progress_bar=False) for _ in range(3)]
    assert runs[0]["2"]["foreground"] == runs[1]["2"]["foreground"] == runs[2]["2"]["foreground"]
    assert runs[0]["2"]["foreground"]["mean"] > runs[0]["2"]["whole_image"]["mean"]  # bone and tissue vs air


# ----------------------------------------------------------------------------- target mapping
CT_STATISTICS = {"name": "CT", "units": "HU", "min": -3024.0, "max": 3071.0,
                 "whole_image": {"percentiles": {"0.5": -1010.0, "99.5": 1400.0}},
                 "foreground": {"percentiles": {"0.5": -90.0, "99.5": 1250.0}}}


def test_target_mapping_round_trips_hu_within_1_hu():
    import torch

    mapping = mapping_from_statistics("CT", CT_STATISTICS)
    assert mapping.clip_range == (-1200.0, 3071.0)  # padding below noisy air is not kept
    hu = np.random.default_rng(0).uniform(-1200, 3071, 200_000).astype(np.float32)
    network = mapping.to_network(hu)
    assert network.dtype == np.float32 and network.min() >= -1.0 and network.max() <= 1.0
    assert np.abs(mapping.from_network(network) - hu).max() < 1.0
    assert np.all(np.diff(mapping.to_network(np.sort(hu))) >= 0)
    tensor = torch.from_numpy(hu)
    assert float((mapping.from_network(mapping.to_network(tensor)) - tensor).abs().max()) < 1.0
    # the spine window gets more of the network range per HU than air
    slope_window = (mapping.to_network(1000.0) - mapping.to_network(0.0)) / 1000
    slope_air = (mapping.to_network(-200.0) - mapping.to_network(-1200.0)) / 1000
    assert slope_window > 2 * slope_air
    assert mapping.to_network(-5000.0) == -1.0 and mapping.to_network(5000.0) == 1.0
    assert ChannelIntensityMapping.from_dict(mapping.to_dict()) == mapping


@settings(max_examples=60, deadline=None)
@given(low=st.floats(-4000, 1000), span=st.floats(1.0, 6000), window=st.tuples(st.floats(0, 1), st.floats(0, 1)))
def test_any_statistics_give_an_invertible_mapping(low, span, window):
    a, b = sorted(window)
    statistics = {"units": "HU", "min": low, "max": low + span, "whole_image": {},
                  "foreground": {"percentiles": {"0.5": low + a * span, "99.5": low + b * span}}}
    mapping = mapping_from_statistics("CT", statistics)
    lo, hi = mapping.clip_range
    values = np.linspace(lo, hi, 1001)
    assert np.abs(mapping.from_network(mapping.to_network(values)) - values).max() < 1.0


# ----------------------------------------------------------------------------- memory model
def test_memory_model_counts_what_plainconvunet_counts():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from torch import nn

    kernels, strides = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    kwargs = {"features_per_stage": [16, 32, 64, 128], "kernel_sizes": kernels, "strides": strides,
              "n_conv_per_stage": [2] * 4, "n_conv_per_stage_decoder": [2] * 3, "time_embedding_dim": 64,
              "attention_stages": [3]}
    network = PlainConvUNet(3, 4, kwargs["features_per_stage"], nn.Conv3d, kernels, strides, 2, 2, 2, True,
                            nn.InstanceNorm3d, {}, None, None, nn.LeakyReLU, {})
    patch = (12, 48, 40)
    cost = analytic_cost(patch, kwargs, 3, 2)
    assert cost.plain_unet_elements == int(network.compute_conv_feature_map_size(patch))
    assert cost.feature_map_elements > cost.plain_unet_elements  # time embedding, attention, io tensors
    budget = Budget(device_profile("cpu"), 3)
    assert budget.fits(analytic_cost((8, 16, 16), kwargs, 3, 2), 2)
    assert not budget.fits(analytic_cost((64, 256, 256), kwargs, 3, 2), 2)


# ----------------------------------------------------------------------------- API errors and CLI
def test_api_rejects_bad_requests(planned, tmp_path):
    with pytest.raises(SpineDiffError, match="already exists"):
        plan_dataset(991, device="cpu", raw_folder=planned["raw"], preprocessed_folder=planned["pre"])
    with pytest.raises(SpineDiffError, match="Unknown configuration"):
        plan_dataset(991, configurations=["4d"], raw_folder=planned["raw"], preprocessed_folder=tmp_path)
    broken = planned["root"] / "raw_broken"
    shutil.copytree(planned["raw"] / "Dataset993_Trans", broken / "Dataset995_Broken")
    dataset_json = load(broken / "Dataset995_Broken" / "dataset.json")
    dataset_json["spinediff"]["target_channels"] = [5]
    (broken / "Dataset995_Broken" / "dataset.json").write_text(json.dumps(dataset_json))
    with pytest.raises(SpineDiffError, match="names channel"):
        plan_dataset(995, device="cpu", preprocess=False, raw_folder=broken, preprocessed_folder=tmp_path,
                     show_progress_bar=False, intensity_samples=10_000)


def test_cli_help_and_missing_dataset(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--device", "--memory-target-gb", "--no-preprocess", "-np", "-c"):
        assert flag in out
    (tmp_path / "raw").mkdir()
    assert main(["plan", "-d", "999", "--raw", str(tmp_path / "raw"), "--preprocessed", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "No dataset with ID 999" in err and "Traceback" not in err


def test_cli_plans_and_prints_table(planned, tmp_path, capsys):
    code = main(["plan", "-d", "992", "--raw", str(planned["raw"]), "--preprocessed", str(tmp_path), "--device",
                 "cuda", "--memory-target-gb", "12", "--no-preprocess", "-q"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| configuration" in out and "| 2d_diffusion" in out and "| 3d_fullres " in out
    assert "recommended diffusion configuration: 2d_diffusion" in out
    plans = load(tmp_path / "Dataset992_Aniso" / "nnUNetPlans.json")
    assert plans["spinediff"]["device"] == "cuda" and plans["spinediff"]["memory_target_gb"] == 12


@pytest.mark.parametrize("damage", ["truncated", "nan", "undeclared_label", "channel_origin"])
def test_plan_checks_its_input_first_and_writes_nothing(tmp_path, damage):
    raw, pre = tmp_path / "raw", tmp_path / "preprocessed"
    dataset = write_dataset(raw, "Dataset996_Damaged", shape_xyz=(24, 24, 12), cases=3, channels=("T1w", "T2w"))
    image = dataset / "imagesTr" / "case001_0000.nii.gz"
    if damage == "truncated":
        data = image.read_bytes()
        image.write_bytes(data[: len(data) // 2])
    elif damage == "nan":
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(image)))
        array[2, 3, 4] = np.nan
        sitk.WriteImage(sitk.GetImageFromArray(array), str(image))
    elif damage == "undeclared_label":
        label = dataset / "labelsTr" / "case001.nii.gz"
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(label)))
        array[0, 0, 0] = 7
        sitk.WriteImage(sitk.GetImageFromArray(array), str(label))
    else:
        other = sitk.ReadImage(str(dataset / "imagesTr" / "case001_0001.nii.gz"))
        other.SetOrigin((5.0, 0.0, 0.0))
        sitk.WriteImage(other, str(dataset / "imagesTr" / "case001_0001.nii.gz"))
    with pytest.raises(SpineDiffError, match="case001") as error:
        plan_dataset(996, device="cpu", num_processes=1, raw_folder=raw, preprocessed_folder=pre,
                     show_progress_bar=False, intensity_samples=10_000)
    assert "Nothing was planned" in str(error.value)
    assert not (pre / "Dataset996_Damaged").exists()
