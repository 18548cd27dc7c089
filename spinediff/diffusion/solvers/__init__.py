"""Solvers: the step rule of sampling, one small class per solver, found by name.

Every module of this package is imported once and every subclass of :class:`~spinediff.diffusion.solvers.base.Solver`
with a ``name`` is a solver (as ``spinediff.training.registry`` finds trainers): a new solver is one class in one
file here, with nothing else to register. The sliding-window loop (:class:`spinediff.diffusion.sampler.
SlidingWindowSampler`) knows no solver by name; the plans' ``solver``, ``spinediff predict --solver`` and
``spinediff tune_sampling`` take any name listed by :func:`solver_names`. See ``documentation/extending.md``.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from spinediff.diffusion.solvers.base import Solver
from spinediff.errors import SpineDiffError

__all__ = ["Solver", "check_solver", "make_solver", "solver_class", "solver_names"]


@cache
def solver_classes() -> dict[str, type[Solver]]:
    """Name → solver class, for every solver of this package, in their ``order``."""
    for module in pkgutil.iter_modules(__path__, f"{__name__}."):
        importlib.import_module(module.name)
    found: dict[str, type[Solver]] = {}
    stack = list(Solver.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.name and cls.__module__.startswith(f"{__name__}."):
            found.setdefault(cls.name, cls)
    return dict(sorted(found.items(), key=lambda item: (item[1].order, item[0])))


def solver_names(rectified_flow: bool | None = None) -> tuple[str, ...]:
    """Every solver's name (only those for a rectified-flow or a DDPM-schedule model when given)."""
    return tuple(name for name, cls in solver_classes().items()
                 if rectified_flow is None or cls.rectified_flow == rectified_flow)


def _listing(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def solver_class(name: str, option: str = "solver") -> type[Solver]:
    """The solver class called ``name``; a clear error naming ``option`` and the known names otherwise."""
    classes = solver_classes()
    if name not in classes:
        raise SpineDiffError(f"{option} must be one of {', '.join(classes)}, got {name!r}.")
    return classes[name]


def check_solver(name: str, noise_schedule: str, num_train_timesteps: int, num_inference_steps: int | None = None,
                 option: str = "solver") -> type[Solver]:
    """The solver class of ``name`` after checking it fits a model trained with ``noise_schedule`` (rectified flow
    samples with its own solvers, the DDPM schedules with theirs) and, when given, the step count."""
    cls = solver_class(name, option)
    flow = noise_schedule == "rflow"
    if cls.rectified_flow != flow:
        raise SpineDiffError(f"{option} {name}: a model trained with noise_schedule {noise_schedule!r} samples "
                             f"with {_listing(solver_names(flow))}.")
    most = cls.max_inference_steps(num_train_timesteps)
    if num_inference_steps is not None and not 1 <= num_inference_steps <= most:
        raise SpineDiffError(f"{option} {name} takes 1 to {most} steps for a model of {num_train_timesteps} "
                             f"timesteps, got {num_inference_steps}.")
    return cls


def make_solver(name: str, process, clip_sample: bool = True) -> Solver:
    """A solver ``name`` for ``process``'s schedule and prediction type (a :class:`DiffusionProcess`)."""
    cls = check_solver(name, process.noise_schedule, process.num_train_timesteps)
    return cls(process, clip_sample)
