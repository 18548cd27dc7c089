"""The one reader of a plans file: nnunetv2's ``PlansManager`` / ``ConfigurationManager`` with spinediff's
blocks typed.

Every module that needs something from a plans file (``nnUNetPlans.json`` in the preprocessed folder, or
``plans.json`` in a results folder) asks :class:`SpineDiffPlans`; ``inherits_from`` is resolved by nnunetv2,
and the ``diffusion``, ``schedule`` and ``target_intensity`` blocks come back as typed objects:

>>> plans = SpineDiffPlans.read(path)                       # doctest: +SKIP
>>> configuration = plans.configuration("2d_diffusion")     # doctest: +SKIP
>>> configuration.diffusion.num_inference_steps             # doctest: +SKIP

Configurations for other prediction types (``2d_diffusion_eps``: noise mode, ``2d_diffusion_v``) and for
rectified flow (``2d_diffusion_rflow``: the same network and target, noise_schedule ``rflow``, Euler
sampling) are made at planning time by :func:`derived_configurations`; training only looks them up
(:meth:`SpineDiffPlans.for_prediction_type`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from spinediff.diffusion.settings import LEGACY_SOLVER_KEY, PREDICTION_TYPES, DiffusionSettings
from spinediff.errors import SpineDiffError
from spinediff.io import read_json
from spinediff.planning.target_intensity import TargetIntensity

#: What users may type for a prediction type (``--prediction-type``) → monai's name.
PREDICTION_TYPE_ALIASES = {"x0": "sample", "image": "sample", "sample": "sample", "eps": "epsilon",
                           "noise": "epsilon", "epsilon": "epsilon", "v": "v_prediction",
                           "v_prediction": "v_prediction"}
#: The suffix of a derived configuration's name (``2d_diffusion_eps``).
PREDICTION_TYPE_SUFFIX = {"sample": "x0", "epsilon": "eps", "v_prediction": "v"}
#: Marks a configuration made by :func:`derived_configurations` (nnunetv2 ignores the key).
DERIVED = "derived_from"


def prediction_type_of(text: str) -> str:
    """monai's prediction type for a user's name of it (x0/image, eps/noise, v)."""
    wanted = PREDICTION_TYPE_ALIASES.get(text)
    if wanted is None:
        raise SpineDiffError(f"Unknown prediction type {text!r}; use x0 (image mode), eps (noise mode) or v.")
    return wanted


def derived_configurations(configurations: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """For each diffusion configuration, one configuration per other prediction type and one with rectified flow
    (``NAME_rflow``; x0 prediction as planned, or v when the plan predicts epsilon): each inherits everything
    and overrides the diffusion block, so nnU-Net's results folder (``TRAINER__PLANS__CONFIG``) keeps
    image-mode, noise-mode and flow models apart. Made by the planner; training only looks them up."""
    manager = PlansManager({"configurations": copy.deepcopy(dict(configurations))})
    derived: dict[str, dict[str, Any]] = {}
    for name, own in configurations.items():
        if DERIVED in own:
            continue
        diffusion = manager.get_configuration(name).configuration.get("diffusion")
        if not diffusion:
            continue
        for prediction_type in PREDICTION_TYPES:
            if prediction_type != diffusion.get("prediction_type"):
                derived[f"{name}_{PREDICTION_TYPE_SUFFIX[prediction_type]}"] = {
                    "inherits_from": name, DERIVED: name,
                    "diffusion": dict(diffusion, prediction_type=prediction_type)}
        if diffusion.get("noise_schedule") != "rflow":
            planned_type = diffusion.get("prediction_type", "sample")
            flow_type = "v_prediction" if planned_type == "epsilon" else planned_type
            derived[f"{name}_rflow"] = {"inherits_from": name, DERIVED: name, "diffusion": dict(
                {k: v for k, v in diffusion.items() if k != LEGACY_SOLVER_KEY}, noise_schedule="rflow",
                solver="euler", prediction_type=flow_type)}
    return derived


REPLAN = ("Plan again with `spinediff plan --overwrite` (for a model folder's plans.json: restore it from the "
          "preprocessed plans the model was trained with).")


def _whole_numbers(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)


def check_configuration(configuration: Mapping[str, Any], name: str, source: str) -> None:
    """The schema of the fields every reader relies on: ``patch_size`` (whole numbers >= 1), ``spacing``
    (finite numbers > 0, one per patch axis), ``batch_size`` (a whole number >= 1) and, where there is one,
    ``augmentation.elastic.p`` (0 to 1); a damaged or hand-edited plans file is refused here, naming the file, before
    a network is built from it."""
    where = f"{source}: configuration {name!r}"
    patch = configuration.get("patch_size")
    if not _whole_numbers(patch) or len(patch) not in (2, 3) or min(patch) < 1:
        raise SpineDiffError(f"{where} has patch_size {patch!r}; it must be 2 or 3 whole numbers of at least 1. "
                             f"{REPLAN}")
    spacing = configuration.get("spacing")
    if not (isinstance(spacing, (list, tuple)) and len(spacing) == len(patch)
            and all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0
                    for s in spacing)):
        raise SpineDiffError(f"{where} has spacing {spacing!r}; it must be {len(patch)} finite numbers greater than 0, "
                             f"one per axis of patch_size {list(patch)}. {REPLAN}")
    batch = configuration.get("batch_size")
    if not (isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1):
        raise SpineDiffError(f"{where} has batch_size {batch!r}; it must be a whole number of at least 1. {REPLAN}")
    augmentation = configuration.get("augmentation")
    elastic = augmentation.get("elastic") if isinstance(augmentation, dict) else None
    if elastic is not None:
        try:
            elastic_share(elastic)
        except ValueError as exc:
            raise SpineDiffError(f"{where} has {exc}. {REPLAN}") from None


def elastic_share(elastic: Any) -> float:
    """The share of training patches an ``augmentation.elastic`` block (``{"p": 0.3}``) deforms elastically;
    ValueError unless ``p`` is a number from 0 to 1."""
    p = elastic.get("p") if isinstance(elastic, dict) else None
    if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1):
        raise ValueError(f"augmentation.elastic.p {p!r} (in {elastic!r}); it must be a number between 0 and 1 (the "
                         "share of training patches deformed elastically; 0.3 was measured), or no elastic block")
    return float(p)


class PlannedConfiguration:
    """One configuration of a plans file: nnunetv2's :class:`ConfigurationManager` (``.manager``, for
    nnunetv2's own functions) and spinediff's blocks as typed properties."""

    def __init__(self, name: str, manager: ConfigurationManager, source: str) -> None:
        self.name = name
        self.manager = manager
        self.source = source

    @property
    def configuration(self) -> dict[str, Any]:
        """The resolved configuration dictionary (``inherits_from`` applied)."""
        return self.manager.configuration

    @property
    def is_diffusion(self) -> bool:
        return "diffusion" in self.configuration

    @property
    def levels_axis(self) -> int | None:
        """The patch axis the labels' levels follow (``augmentation.field_of_view.axis``, planned where the labels
        keep an order along the spine), None without one."""
        return ((self.configuration.get("augmentation") or {}).get("field_of_view") or {}).get("axis")

    @property
    def is_derived(self) -> bool:
        """Made by :func:`derived_configurations` (another prediction type of a planned configuration)."""
        return DERIVED in self.configuration

    @property
    def diffusion(self) -> DiffusionSettings:
        """The typed diffusion block; a clear error for a configuration without one."""
        if not self.is_diffusion:
            raise SpineDiffError(
                f"{self.source}: configuration {self.name!r} has no diffusion block; plan with spinediff "
                "(2d_diffusion / 3d_diffusion) or choose a diffusion configuration.")
        return DiffusionSettings.from_dict(self.configuration["diffusion"],
                                           source=f"{self.source}, configuration {self.name!r}")

    @property
    def target_intensity(self) -> TargetIntensity | None:
        """The target's intensity map of an image task (None for segmentation or non-diffusion configurations)."""
        block = self.configuration.get("diffusion", {}).get("target_intensity")
        return TargetIntensity.from_dict(block) if block else None

    @property
    def schedule(self) -> dict[str, Any] | None:
        """The ``schedule`` block of a budget plan (None for plans made without ``--budget``)."""
        return self.configuration.get("schedule")


class SpineDiffPlans:
    """A plans dictionary read through nnunetv2's :class:`PlansManager`."""

    def __init__(self, plans: Mapping[str, Any], source: str = "plans") -> None:
        self.plans = dict(plans)
        self.source = source
        self.manager = PlansManager(copy.deepcopy(self.plans))

    @classmethod
    def read(cls, path: str | Path) -> SpineDiffPlans:
        path = Path(path)
        if path.is_dir():
            raise SpineDiffError(f"The plans file {path} is a folder, not a file; run `spinediff plan` to write it.")
        if not path.is_file():
            raise SpineDiffError(f"No plans file {path}; run `spinediff plan` first.")
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("configurations"), dict):
            raise SpineDiffError(f"{path} is not a plans file (no 'configurations' object); it was edited or damaged. "
                                 f"{REPLAN}")
        return cls(data, source=str(path))

    @property
    def names(self) -> list[str]:
        """Every configuration, derived ones included."""
        return list(self.plans.get("configurations", {}))

    @property
    def planned_names(self) -> list[str]:
        """The configurations a user chooses between (derived prediction types left out)."""
        return [name for name in self.names if DERIVED not in self.plans["configurations"][name]]

    def __contains__(self, name: object) -> bool:
        return name in self.plans.get("configurations", {})

    def configuration(self, name: str) -> PlannedConfiguration:
        if name not in self:
            raise SpineDiffError(f"{self.source} has no configuration {name!r}; available: "
                                 f"{', '.join(self.planned_names)}.")
        if not isinstance(self.plans["configurations"][name], dict):
            raise SpineDiffError(f"{self.source}: configuration {name!r} is not an object. {REPLAN}")
        manager = self.manager.get_configuration(name)
        check_configuration(manager.configuration, name, self.source)
        return PlannedConfiguration(name, manager, self.source)

    def for_prediction_type(self, name: str, prediction_type: str | None) -> str:
        """The configuration to train for ``--prediction-type``: ``name`` itself when it already predicts that
        (or none is asked), else its derived configuration (planned by :func:`derived_configurations`)."""
        configuration = self.configuration(name)
        if prediction_type is None:
            return name
        wanted = prediction_type_of(prediction_type)
        if configuration.diffusion.prediction_type == wanted:
            return name
        derived = f"{name}_{PREDICTION_TYPE_SUFFIX[wanted]}"
        if derived not in self:
            raise SpineDiffError(f"{self.source} has no {derived!r} (prediction type {wanted}): these plans were made "
                                 "before derived configurations were planned; re-run `spinediff plan`.")
        return derived
