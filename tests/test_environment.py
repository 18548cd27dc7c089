"""The software a run used is recorded beside its numbers (spinediff/utilities/environment.py): a seeded training
repeats only with the same packages (results.md, eighteenth run)."""

from __future__ import annotations

from importlib import metadata

import torch

from spinediff.utilities.environment import PACKAGES, describe, software_environment


def test_the_environment_names_the_installed_versions_and_torchs_threads():
    environment = software_environment()
    assert set(environment["packages"]) == set(PACKAGES)
    for name in ("torch", "nnunetv2", "numpy", "monai"):
        assert environment["packages"][name] == metadata.version(name)
    assert environment["torch_threads"] == torch.get_num_threads()
    commit = environment["spinediff_commit"]
    assert commit is None or len(commit.removesuffix("-dirty")) == 40
    line = describe(environment)
    assert f"torch {metadata.version('torch')}" in line and f"nnunetv2 {metadata.version('nnunetv2')}" in line
