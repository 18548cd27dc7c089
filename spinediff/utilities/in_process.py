"""nnU-Net's worker pools in this process when it is given one worker.

nnunetv2 always starts a *spawned* pool (``multiprocessing.get_context("spawn").Pool(n)``), also for one worker,
and each spawned worker re-imports torch and nnunetv2 before doing its first job: 2-5 s per pool on a 2-core
machine (measured in the test suite: a third of the stress test's wall time was spent waiting for spawned workers
of fold validations, metric computations and predictions of a few cases each). With one worker the work is
sequential anyway, so here it runs in a thread of this process instead.

nnunetv2's listing of a folder's files per case forks a pool of 12 for a name match (:func:`file_lists_in_process`):
that runs in this process always.

One worker means: ``num_processes == 1`` where spinediff passes it (planning ``-np 1``, its own validation's
metrics), and nnU-Net's ``nnUNet_def_n_proc=1`` for the pools nnunetv2 sizes itself (the export pool and the
metrics of its trainers' final validation) and for spinediff's calls of nnU-Net's predictor
(:func:`predict_nnunet_files`).

nnU-Net's export sets torch's thread count to its worker count while it resamples a case (and back after): in this
process that is torch's global setting, so with one worker the validation's next prediction, beside the export
thread, may run on one thread for that while. Correctness is unaffected; a machine with many cores keeps nnU-Net's
default of 8 workers and its spawned pools.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType


class _InProcessContext:
    """Stands in for ``multiprocessing.get_context("spawn")``: a pool of one thread in this process."""

    @staticmethod
    def Pool(processes: int | None = None):  # noqa: N802 - multiprocessing's name
        from multiprocessing.pool import ThreadPool

        return ThreadPool(1)


class _InProcessMultiprocessing:
    @staticmethod
    def get_context(method: str | None = None) -> type[_InProcessContext]:
        return _InProcessContext


def nnunet_one_worker() -> bool:
    """Whether nnU-Net's own worker count (``nnUNet_def_n_proc``, read by nnunetv2 at import) is 1."""
    from nnunetv2.configuration import default_num_processes

    return int(default_num_processes) <= 1


@contextlib.contextmanager
def _replaced(modules: tuple[ModuleType, ...], attribute: str, value: object, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    saved = [getattr(module, attribute) for module in modules]
    for module in modules:
        setattr(module, attribute, value)
    try:
        yield
    finally:
        for module, original in zip(modules, saved, strict=True):
            setattr(module, attribute, original)


def pools_in_process(*modules: ModuleType, enabled: bool = True):
    """While the block runs, the ``multiprocessing`` of each of nnunetv2's ``modules`` hands out a one-thread pool
    of this process (``enabled``; otherwise nothing changes)."""
    return _replaced(modules, "multiprocessing", _InProcessMultiprocessing, enabled)


def file_lists_in_process():
    """nnunetv2's ``create_lists_from_splitted_dataset_folder`` (behind ``get_filenames_of_train_images_and_targets``
    and the predictor's input folders) in this process. It matches file names against a pattern per case in a
    *forked* pool of 12 workers: a fork of a process holding torch costs 20-30 ms per worker (0.3-1 s per call, 2 of
    the 3.6 s a plan of the test phantom took), for work a thread does in microseconds."""
    from nnunetv2.utilities import utils

    return _replaced((utils,), "Pool", _InProcessContext.Pool, True)


def metrics_in_process(enabled: bool = True):
    """nnunetv2's ``compute_metrics_on_folder`` in this process (``enabled``)."""
    from nnunetv2.evaluation import evaluate_predictions

    return pools_in_process(evaluate_predictions, enabled=enabled)


def nnunet_validation(trainer, save_probabilities: bool = False) -> None:
    """``trainer.perform_actual_validation``; for nnU-Net's trainers with one worker (:func:`nnunet_one_worker`),
    their export pool and their metrics in this process."""
    from nnunetv2.evaluation import evaluate_predictions
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    with pools_in_process(trainer_module, evaluate_predictions, enabled=nnunet_one_worker()):
        trainer.perform_actual_validation(save_probabilities)


def predict_nnunet_files(predictor, inputs: str, output: str, save_probabilities: bool, overwrite: bool = True) -> None:
    """nnU-Net's prediction of a folder: in this process with one worker (:func:`nnunet_one_worker`,
    ``predict_from_files_sequential``), otherwise with one preprocessing and one export worker beside it."""
    if nnunet_one_worker():
        Path(output).mkdir(parents=True, exist_ok=True)  # the sequential path writes its records there first
        with contextlib.redirect_stdout(io.StringIO()), file_lists_in_process():  # it prints a line per case
            predictor.predict_from_files_sequential(inputs, output, save_probabilities=save_probabilities,
                                                    overwrite=overwrite)
    else:
        with file_lists_in_process():
            predictor.predict_from_files(inputs, output, save_probabilities=save_probabilities, overwrite=overwrite,
                                         num_processes_preprocessing=1, num_processes_segmentation_export=1)
