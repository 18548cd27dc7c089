"""Shared fixtures: a tiny phantom written once per test session."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("nnUNet_n_proc_DA", "0")  # augmentation in the main process: no workers to hang
# nnU-Net's other pools (validation export and metrics, prediction) in this process: one worker each, not spawned
# (spinediff.utilities.in_process; each spawned worker re-imports torch, seconds per pool)
os.environ.setdefault("nnUNet_def_n_proc", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# One thread: with two OpenMP threads, any other busy process on this 2-core machine makes torch's
# thread barriers spin and a training step ~10x slower (measured: 0.10 s vs 0.98 s per step).
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from spinediff.datasets.phantom import PhantomSettings  # noqa: E402

# Small grids: the same anatomy (in mm) on coarser voxels keeps every test fast.
TINY_SETTINGS = PhantomSettings(mr_shape=(48, 64, 8), mr_spacing=(3.2, 3.2, 7.0), ct_spacing=(3.0, 3.0, 3.0))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

#: The integration tier: modules whose tests plan, preprocess, train or run whole commands (demo, predict) on the
#: phantom. Their tests are marked ``slow``; ``pytest -m "not slow"`` runs the fast unit tier (no planning or
#: training, about a minute on 2 cores), ``pytest tests`` (the README's command, .ci/run) runs both.
INTEGRATION_MODULES = frozenset({
    "test_budget", "test_convert", "test_demo", "test_device", "test_distributed", "test_evaluation",
    "test_generation_mr", "test_inference", "test_planning", "test_precision", "test_refinement", "test_robustness",
    "test_robustness_writes", "test_slice_directions", "test_three_d", "test_training", "test_translation_baselines",
})
#: single end-to-end tests in otherwise fast modules
INTEGRATION_TESTS = frozenset({"test_cli.py::test_phantom_command_end_to_end"})


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module is not None else ""
        if module in INTEGRATION_MODULES or f"{module}.py::{item.name}" in INTEGRATION_TESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_settings() -> PhantomSettings:
    return TINY_SETTINGS


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """Three phantom datasets (segmentation 901, translation 902, generation 903), 3 cases each."""
    from spinediff.datasets.phantom_writer import write_phantom_datasets

    root = tmp_path_factory.mktemp("phantom_raw")
    write_phantom_datasets(root, num_cases=3, seed=7, settings=TINY_SETTINGS, progress=False)
    return root


#: folders of session-scoped fixtures under pytest's base temporary folder: kept for the whole run
SESSION_FOLDERS = ("phantom_raw",)


@pytest.fixture(scope="module", autouse=True)
def _module_scratch_removed(request, tmp_path_factory) -> Iterator[None]:
    """Removes what a module's tests and fixtures wrote under pytest's base temporary folder once the module is
    done, unless one of its tests failed (then it stays there to look at). pytest alone keeps every test's folder to
    the end of the run: the suite's trained folds, plans and predictions came to 1.7 GB (about 0.2 GB at the peak
    now), and a CI run failed every test after a checkpoint save, most likely on a machine short of disk. Autouse at
    module scope: set up before, and torn down after, the module's own fixtures."""
    import shutil

    base = tmp_path_factory.getbasetemp()
    before = {p.name for p in base.iterdir()}
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed != failed:
        return
    for path in base.iterdir():
        if path.name not in before and not path.name.startswith(SESSION_FOLDERS):
            if path.is_symlink():  # pytest's "<name>current" link to the newest numbered folder
                path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)


def requires_shared_data(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs the real sample data at {path} (../shared/data beside the repository), absent here")
    return path


@contextlib.contextmanager
def nnunet_folders(raw: Path, base: Path) -> Iterator[dict[str, str]]:
    """nnU-Net's folder variables pointed at ``raw`` and ``base/{preprocessed,results}`` (no augmentation
    workers) while the block runs; the previous values come back afterwards."""
    env = {"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(base / "preprocessed"),
           "nnUNet_results": str(base / "results"), "nnUNet_n_proc_DA": "0"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def planned_phantom(phantom_root: Path, tmp_path_factory, name: str, dataset_id: int, prefix: str,
                    configurations: tuple[str, ...] = ("2d_diffusion",)) -> Iterator[dict]:
    """A fresh folder whose ``raw/`` links the phantom's dataset ``name``, planned (``configurations``) with its
    splits, nnU-Net's variables pointed at it while the block runs; yields them with ``base`` and ``raw`` (the
    dataset's raw folder)."""
    from spinediff.planning.api import plan_dataset
    from spinediff.training.api import ensure_splits

    base = tmp_path_factory.mktemp(prefix)
    raw = base / "raw"
    raw.mkdir()
    (raw / name).symlink_to(phantom_root / name, target_is_directory=True)
    with nnunet_folders(raw, base) as env:
        plan_dataset(dataset_id, configurations=list(configurations), device="cpu", num_processes=1,
                     show_progress_bar=False)
        ensure_splits(base / "preprocessed" / name)
        yield {**env, "base": base, "raw": raw / name}
