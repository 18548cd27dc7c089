"""How a trained diffusion model samples by default: a solver, a step count and a warm start chosen on its
cross-validation (``MODEL_FOLDER/sampling.json``).

The plans fix a first guess (``solver``, ``num_inference_steps``, ``warm_start`` in the diffusion block) before
any model exists. After training, ``spinediff tune_sampling`` (:mod:`spinediff.experiments.sampling`) predicts
the folds' validation cases with each candidate setting and keeps the one with the fewest network calls per
sample whose quality is within a tolerance of the best candidate's, the way nnU-Net decides its post-processing
on the cross-validation. ``spinediff predict`` then uses it wherever the command line does not say otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from spinediff.diffusion.settings import LEGACY_SOLVER_KEY
from spinediff.diffusion.solvers import solver_class
from spinediff.errors import SpineDiffError
from spinediff.io import read_json, write_json

SAMPLING_FILE = "sampling.json"
#: The keys of a sampling.json (``sampler``: the solver's name in files written before it was renamed).
SAMPLING_KEYS = frozenset({"solver", LEGACY_SOLVER_KEY, "num_inference_steps", "warm_start", "chosen"})


@dataclass(frozen=True)
class SamplingSetting:
    """One way to sample: the solver, its steps and an optional warm start (fraction of T)."""

    solver: str
    num_inference_steps: int
    warm_start: float | None = None

    def __post_init__(self) -> None:
        solver_class(self.solver)  # a known name, or a clear error naming the known ones
        if int(self.num_inference_steps) < 1:
            raise SpineDiffError(f"steps must be at least 1, got {self.num_inference_steps}.")
        if self.warm_start is not None and not 0 < self.warm_start < 1:
            raise SpineDiffError(f"warm start must be in (0, 1), got {self.warm_start}.")

    @property
    def network_calls(self) -> int:
        """Network calls per sample and window: the steps, plus the warm start's one-call estimate."""
        return int(self.num_inference_steps) + (1 if self.warm_start else 0)

    @classmethod
    def parse(cls, text: str) -> SamplingSetting:
        """``SOLVER:STEPS[@WARM]``, e.g. ``dpm++2m:5`` or ``ddim:2@0.5``."""
        solver, _, rest = text.partition(":")
        steps, _, warm = rest.partition("@")
        try:
            return cls(solver, int(steps), float(warm) if warm else None)
        except ValueError:
            raise SpineDiffError(f"{text!r} is not SOLVER:STEPS[@WARM] (e.g. dpm++2m:5, ddim:2@0.5).") from None

    def label(self) -> str:
        return f"{self.solver}:{self.num_inference_steps}" + (f"@{self.warm_start:g}" if self.warm_start else "")


@dataclass(frozen=True)
class SamplingChoice:
    """The chosen setting and how it was chosen (every candidate's quality and cost, the rule, the cases)."""

    setting: SamplingSetting
    chosen: dict = field(default_factory=dict)

    @classmethod
    def read(cls, model_folder: str | Path) -> SamplingChoice | None:
        """The model's choice, or None when it has none (the plans' settings then apply)."""
        path = Path(model_folder) / SAMPLING_FILE
        if not path.exists():
            return None
        data = read_json(path)
        fix = "run `spinediff tune_sampling` again or move it aside to sample as the plans say."
        if not isinstance(data, dict):
            raise SpineDiffError(f"{path} holds a JSON {type(data).__name__}, not a sampling choice object; {fix}")
        unknown = sorted(set(data) - SAMPLING_KEYS)
        if unknown:
            raise SpineDiffError(f"{path} has unknown key(s) {unknown} (known: {sorted(SAMPLING_KEYS)}); {fix}")
        if not isinstance(data.get("chosen", {}), dict):
            raise SpineDiffError(f"{path}: 'chosen' must be an object; {fix}")
        try:
            warm = data.get("warm_start")
            solver = data["solver"] if "solver" in data else data[LEGACY_SOLVER_KEY]  # older files: "sampler"
            setting = SamplingSetting(str(solver), int(data["num_inference_steps"]),
                                      None if warm is None else float(warm))
        except (KeyError, TypeError, ValueError) as exc:
            raise SpineDiffError(f"{path} is not a sampling choice ({type(exc).__name__}: {exc}); run `spinediff "
                                 "tune_sampling` again or move it aside to sample as the plans say.") from None
        except SpineDiffError as exc:  # a known solver, steps >= 1, a warm start in (0, 1)
            raise SpineDiffError(f"{path}: {exc} {fix[0].upper()}{fix[1:]}") from None
        return cls(setting, dict(data.get("chosen", {})))

    def write(self, model_folder: str | Path) -> Path:
        path = Path(model_folder) / SAMPLING_FILE
        write_json({"solver": self.setting.solver, "num_inference_steps": self.setting.num_inference_steps,
                    "warm_start": self.setting.warm_start, "chosen": self.chosen}, path)
        return path
