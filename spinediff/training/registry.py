"""Trainers found by class name, as nnU-Net finds its own (``recursive_find_python_class``).

Every module of ``spinediff.training`` is imported once and every subclass of :class:`SpineDiffTrainer` defined
there is a trainer: a new trainer is one class in one file of this package, with nothing to register.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

import spinediff.training as training_package
from spinediff.errors import SpineDiffError
from spinediff.training.base import SpineDiffTrainer


@cache
def trainer_classes() -> dict[str, type[SpineDiffTrainer]]:
    """Class name → trainer class, for every concrete spinediff trainer."""
    for module in pkgutil.walk_packages(training_package.__path__, f"{training_package.__name__}."):
        if ".nnunet_entry" not in module.name:  # nnU-Net's entry re-exports what is found here
            importlib.import_module(module.name)
    found: dict[str, type[SpineDiffTrainer]] = {}
    stack = list(SpineDiffTrainer.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__module__.startswith(f"{training_package.__name__}."):
            found.setdefault(cls.__name__, cls)
    return dict(sorted(found.items()))


def is_spinediff_trainer(name: str) -> bool:
    return name in trainer_classes()


def is_refiner(name: str) -> bool:
    """Whether trainer ``name`` refines another model's answers (``DiffusionRefinementTrainer`` and its subclasses):
    its validation starts from the initial model's exports, and ``--combine``/``--init-noise`` apply to it."""
    return is_spinediff_trainer(name) and getattr(find_trainer(name), "refines_initial_answers", False)


def find_trainer(name: str) -> type[SpineDiffTrainer]:
    """The spinediff trainer called ``name``."""
    classes = trainer_classes()
    if name not in classes:
        raise SpineDiffError(f"{name!r} is not a spinediff trainer ({', '.join(classes)}).")
    return classes[name]
