"""The software a run used, written beside its numbers (``benchmark.json``, ``stress_position.json``).

A seeded CPU training here is deterministic for one code, data and set of packages; the same recipe trained with
other packages or rebuilt data is another draw (results.md, eighteenth run, where the tenth run's packages had not
been recorded). :func:`software_environment` records what makes a run repeatable: the versions of Python and of the
packages that train, augment and predict, spinediff's commit when it runs from a git checkout, and torch's threads.
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

#: The distributions whose versions change a training or a prediction (their distribution names on PyPI).
PACKAGES = ("torch", "nnunetv2", "batchgeneratorsv2", "batchgenerators", "monai", "diffusers", "numpy", "scipy",
            "SimpleITK")


def _commit() -> str | None:
    """spinediff's git commit (with ``-dirty`` when the checkout has changes), or None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        run = [["git", "-C", str(root), "rev-parse", "HEAD"], ["git", "-C", str(root), "status", "--porcelain",
                                                                "--untracked-files=no"]]
        head, changes = (subprocess.run(c, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
                         for c in run)
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if changes else "") if head else None


def software_environment() -> dict:
    """``{"python", "platform", "spinediff", "spinediff_commit", "packages": {name: version or None},
    "torch_threads"}`` of this process."""
    import torch

    from spinediff.version import __version__

    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "spinediff": __version__,
            "spinediff_commit": _commit(), "packages": packages, "torch_threads": int(torch.get_num_threads())}


def describe(environment: dict) -> str:
    """One line for a Markdown summary: the packages that decide a training's draw."""
    shown = ", ".join(f"{name} {version}" for name, version in environment["packages"].items() if version)
    commit = environment.get("spinediff_commit")
    return (f"Software: Python {environment['python']}, spinediff {environment['spinediff']}"
            + (f" ({commit[:12]})" if commit else "") + f", {shown}; {environment['torch_threads']} torch thread(s).")
