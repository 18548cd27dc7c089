"""Typed, validated access to the ``diffusion`` block of a plans configuration.

The block's keys are fixed by the contract in ``documentation/architecture.md``; this is the one
place that reads them, so trainers and predictors never look up raw dictionary keys.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from spinediff.diffusion.solvers import check_solver
from spinediff.errors import SpineDiffError
from spinediff.tasks import TASKS, Task, get_task

NOISE_SCHEDULES = ("cosine", "linear", "rflow")  # rflow: rectified flow (monai's RFlowScheduler)
#: monai's names of the noise schedules (``monai.networks.schedulers`` ``NoiseSchedules``).
MONAI_SCHEDULE_NAMES = {"cosine": "cosine", "linear": "linear_beta"}
PREDICTION_TYPES = ("sample", "epsilon", "v_prediction")  # monai's DDPMPredictionType names
LOSSES = ("l1", "mse", "dice_ce")
#: the solver's key in plans, checkpoints and sampling.json written before it was called ``solver``
LEGACY_SOLVER_KEY = "sampler"


@dataclasses.dataclass(frozen=True)
class DiffusionSettings:
    """The diffusion settings of one plans configuration (see the contract for each key).

    Defaults follow the three reference works: cosine schedule with T = 1000 and image-mode (x0)
    prediction with L1 loss (Graf et al.'s best DDIM variant, SpineSegDiff's mask prediction); 10
    DDIM steps and 5 samples (SpineSegDiff's ensembles, within the 5-25 steps Graf et al. used);
    deterministic DDIM (eta 0) so that a seed fixes the result; EMA 0.999; no condition dropout.
    """

    task: str
    condition_channels: int
    target_channels: int
    num_train_timesteps: int = 1000
    noise_schedule: str = "cosine"
    prediction_type: str = "sample"
    #: the step rule of sampling, a name of :mod:`spinediff.diffusion.solvers` (plans written before call it
    #: ``sampler``; :meth:`from_dict` still reads that)
    solver: str = "ddim"
    num_inference_steps: int = 10
    eta: float = 0.0
    num_samples: int = 5
    ema_decay: float = 0.999
    loss: str = "l1"
    condition_dropout: float = 0.0
    target_intensity: Mapping[str, Any] | None = None
    #: Training timesteps t = T - 1 - floor(T * u ** power), u uniform: 1 draws them uniformly (DDPM); larger
    #: powers favour the noisy levels, where the network must read the answer from the condition instead of
    #: copying it from a barely noised target (see DiffusionProcess.sample_timesteps).
    timestep_power: float = 1.0
    #: Segmentation with x0 prediction and Dice + CE: the decoder's lower resolutions also predict the mask and
    #: are scored against the downsampled target (nnU-Net's deep supervision, weights 1/2^k); prediction uses
    #: the full-resolution output only.
    deep_supervision: bool = False
    #: Warm start (SpineSegDiff): sampling starts at timestep ``warm_start * (T - 1)`` from the network's one-call x0
    #: estimate noised to that level, and ``num_inference_steps`` steps run below it (1 + steps calls per sample);
    #: None starts from pure noise at T - 1.
    warm_start: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(
        cls, block: Mapping[str, Any], source: str = "the plans' diffusion block"
    ) -> DiffusionSettings:
        """Build from the ``diffusion`` block of a plans configuration.

        Args:
            block: the JSON object.
            source: where it came from (a file and configuration), named in error messages.

        Raises:
            SpineDiffError: for unknown or missing keys and invalid values.
        """
        if not isinstance(block, Mapping):
            raise SpineDiffError(
                f"{source}: the diffusion block must be a JSON object, got {type(block).__name__}"
            )
        block = dict(block)
        if LEGACY_SOLVER_KEY in block:  # plans and checkpoints written before the solver registry
            legacy = block.pop(LEGACY_SOLVER_KEY)
            block.setdefault("solver", legacy)
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(block) - known)
        if unknown:
            raise SpineDiffError(
                f"{source}: unknown diffusion setting(s) {unknown}; known keys are {sorted(known)}. "
                "Fix the spelling or remove them."
            )
        missing = [name for name in ("task", "condition_channels", "target_channels") if name not in block]
        if missing:
            raise SpineDiffError(
                f"{source}: the diffusion block lacks {missing}; re-run planning or add them."
            )
        try:
            return cls(**dict(block))
        except SpineDiffError as error:
            raise SpineDiffError(f"{source}: {error}") from None

    @property
    def task_type(self) -> Task:
        """The task class of ``task``."""
        return get_task(self.task, "diffusion block")

    def to_dict(self) -> dict[str, Any]:
        """The JSON block, as written into the plans."""
        block = dataclasses.asdict(self)
        if self.target_intensity is not None:
            block["target_intensity"] = dict(self.target_intensity)
        return block

    def validate(self) -> None:
        """Raise :class:`SpineDiffError` naming the first invalid value and the allowed ones."""

        def choice(name: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, name) not in allowed:
                raise SpineDiffError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")

        def integer(name: str, low: int, high: float = math.inf) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise SpineDiffError(f"{name} must be an integer in [{low}, {high}], got {value!r}")

        def number(name: str, low: float, high: float, high_inclusive: bool = True) -> None:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value
            ok = ok and (value <= high if high_inclusive else value < high)
            if not ok:
                bracket = "]" if high_inclusive else ")"
                raise SpineDiffError(f"{name} must be a number in [{low}, {high}{bracket}, got {value!r}")

        choice("task", tuple(TASKS))
        choice("noise_schedule", NOISE_SCHEDULES)
        choice("prediction_type", PREDICTION_TYPES)
        choice("loss", LOSSES)
        integer("condition_channels", 0)
        integer("target_channels", 1)
        integer("num_train_timesteps", 2)
        integer("num_inference_steps", 1, self.num_train_timesteps)
        integer("num_samples", 1)
        number("eta", 0.0, 1.0)
        number("ema_decay", 0.0, 1.0, high_inclusive=False)
        number("condition_dropout", 0.0, 1.0, high_inclusive=False)
        number("timestep_power", 0.1, 10.0)
        if self.loss == "dice_ce" and not self.task_type.writes_labels:
            raise SpineDiffError(
                f"loss 'dice_ce' needs a task that predicts labels (segmentation), got task {self.task!r}; "
                "use l1 or mse"
            )
        if not isinstance(self.deep_supervision, bool):
            raise SpineDiffError(f"deep_supervision must be true or false, got {self.deep_supervision!r}")
        if self.deep_supervision and (self.loss != "dice_ce" or self.prediction_type != "sample"):
            raise SpineDiffError(
                "deep_supervision needs loss 'dice_ce' and prediction_type 'sample' (the lower-resolution outputs "
                f"are masks), got loss {self.loss!r} and prediction_type {self.prediction_type!r}"
            )
        check_solver(self.solver, self.noise_schedule, self.num_train_timesteps)  # a known name that fits the schedule
        if self.noise_schedule == "rflow" and self.prediction_type == "epsilon":
            raise SpineDiffError("noise_schedule 'rflow' predicts x0 (sample) or the flow's velocity (v_prediction); "
                                 "epsilon cannot be turned into x0 near pure noise")
        if self.warm_start is not None:
            number("warm_start", 0.0, 1.0, high_inclusive=False)
            if self.warm_start <= 0:
                raise SpineDiffError(f"warm_start must be in (0, 1) or null, got {self.warm_start!r}")
        if self.condition_dropout > 0 and self.condition_channels == 0:
            raise SpineDiffError("condition_dropout > 0 needs a condition (condition_channels > 0)")
        if self.target_intensity is not None and not isinstance(self.target_intensity, Mapping):
            raise SpineDiffError(
                f"target_intensity must be a JSON object or null, got {self.target_intensity!r}"
            )

    @property
    def input_channels(self) -> int:
        """Network input channels: condition + noisy target (contract)."""
        return self.condition_channels + self.target_channels

    @property
    def output_channels(self) -> int:
        """Network output channels: the target channels (contract)."""
        return self.target_channels
