"""Distributed training: 2 processes with gloo on CPU, started by torchrun (``python -m torch.distributed.run``).

Two torchrun launches keep the file under 2 minutes on the shared 2-core machine (each process pays
~12 s for importing torch and nnU-Net): the first runs the fixed-batch comparison and then a tiny
``spinediff.run.train`` training in the same two processes; the second resumes that training with
``--c``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import nnunet_folders

from spinediff.errors import SpineDiffError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # distributed_worker: the code each rank runs, shared with the reference run

import distributed_worker as worker  # noqa: E402

RAW_NAME = "Dataset902_SpinePhantomTranslation"
TRAINER_FOLDER = "DiffusionTranslationTrainer__nnUNetPlans__2d_diffusion"
STEPS = 4
# See test_two_ranks_match_one_process for both numbers.
LOSS_TOLERANCE = 1e-4
WEIGHT_MEDIAN_TOLERANCE = 5e-5
TRAIN = ["-d", "902", "-c", "2d_diffusion", "-f", "0", "--iters-per-epoch", "2", "--val-iters-per-epoch", "1",
         "--steps", "1", "--val-samples", "1"]


@pytest.fixture(scope="module")
def translation_env(tiny_settings, tmp_path_factory):
    """The translation phantom (3 cases), planned and preprocessed (2d_diffusion, global batch 4)."""
    from spinediff.datasets.phantom_writer import write_phantom_datasets
    from spinediff.planning.api import plan_dataset

    base = tmp_path_factory.mktemp("distributed")
    write_phantom_datasets(base / "raw", num_cases=3, seed=7, tasks=("translation",), settings=tiny_settings,
                           progress=False)
    with nnunet_folders(base / "raw", base) as env:
        plan_dataset(902, configurations=["2d_diffusion"], device="cpu", num_processes=1, show_progress_bar=False)
        yield env


def torchrun(arguments: list[str], env: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    """2 ranks on this machine, gloo; torchrun's own rendezvous on a free port (--standalone)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *arguments]
    environment = dict(os.environ, **env, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def first_launch(translation_env, tmp_path_factory):
    """torchrun #1: the fixed-batch steps, then a 1-epoch training of fold 0."""
    out = tmp_path_factory.mktemp("ranks")
    torchrun([str(HERE / "distributed_worker.py"), "--out", str(out), "--steps", str(STEPS),
              "--train", *TRAIN, "--epochs", "1"], translation_env)
    return out


def fold_folder(env: dict) -> Path:
    return Path(env["nnUNet_results"]) / RAW_NAME / TRAINER_FOLDER / "fold_0"


def test_two_ranks_match_one_process(translation_env, first_launch):
    """Same weights on both ranks, and the same loss trajectory as one process with the global batch.

    What is compared: both runs start from the same weights (torch seed 0) and take 4 AdamW steps on
    the same fixed global batches of 4 (random MR/CT-like tensors, ``distributed_worker``), with the
    diffusion timesteps and noise seeded per sample, so the noise is part of the fixed input too. One
    process feeds all 4 samples to ``train_step``; under DDP rank 0 feeds samples 0-1 and rank 1
    samples 2-3 (nnU-Net's split of the global batch). The L1 loss is a mean over samples of equal
    count, so DDP's average of the two ranks' gradients is the gradient of the global batch and the
    global loss is the mean of the two ranks' losses.

    Tolerances: the two runs differ only by float32 summation order (two half-batch means and an
    all-reduce instead of one mean), ~1e-7 relative per gradient element. AdamW divides each
    gradient element by its own running magnitude, so where a gradient element is a near-cancelling
    sum, rounding can flip its sign and move that weight by up to lr = 5e-4; the next steps spread
    such differences. Measured over repeated runs (two phantom versions): losses differ by 3e-8 to
    8e-6, weights by a median of 2e-9 to 2e-6 (max 2e-4). A missing gradient synchronisation (each
    rank trains on its own half; measured once by hand) differs by 3e-3 to 7e-3 in the losses from
    the second step on and by a median of 5e-4 in the weights. Hence 1e-4 for each loss (>10x above
    the rounding, >25x below the bug) and 5e-5 for the median weight difference (>10x either side).
    Weights are compared through their median because single weights may legitimately differ.
    """
    ranks = [torch.load(first_launch / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["batch_size"] for r in ranks] == [2, 2] and ranks[0]["world_size"] == 2  # global batch 4 split
    # Identical weights and EMA on both ranks (bitwise): DDP synchronised every step.
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    assert torch.equal(ranks[0]["ema"], ranks[1]["ema"])
    # Each rank draws its own noise and data-loader samples.
    assert ranks[0]["generator_seed"] != ranks[1]["generator_seed"]
    assert ranks[0]["data_seed"] != ranks[1]["data_seed"]
    # Validation metrics are gathered: both ranks log the value of the global batch.
    assert ranks[0]["val_loss"] == ranks[1]["val_loss"] and ranks[0]["val_ssim"] == ranks[1]["val_ssim"]

    trainer = worker.build_fixed_trainer()  # this process: no process group, batch 4
    assert trainer.batch_size == 4 and not trainer.is_ddp
    reference = worker.run_fixed_steps(trainer, STEPS, first_index=0)
    distributed_losses = np.mean([r["losses"] for r in ranks], axis=0)
    difference = np.abs(distributed_losses - np.array(reference["losses"]))
    weights = (ranks[0]["weights"] - worker.flat_weights(trainer.plain_network)).abs()
    print(f"loss trajectory 1 process: {np.round(reference['losses'], 6).tolist()}, 2 ranks: "
          f"{np.round(distributed_losses, 6).tolist()}, max difference {difference.max():.2e}; weights: median "
          f"difference {weights.median():.2e}, max {weights.max():.2e}, {(weights > 1e-6).double().mean():.2%} > 1e-6")
    assert difference.max() < LOSS_TOLERANCE
    assert abs(ranks[0]["val_loss"] - reference["val_loss"]) < LOSS_TOLERANCE
    assert weights.median() < WEIGHT_MEDIAN_TOLERANCE


def test_only_rank_zero_writes_and_torchrun_resumes(translation_env, first_launch):
    folder = fold_folder(translation_env)
    saves = [json.loads((first_launch / f"rank{r}_saves.json").read_text()) for r in (0, 1)]
    assert saves[1] == []  # rank 1 never wrote a checkpoint
    assert any("checkpoint_final" in path for path in saves[0])
    assert sorted(p.name for p in folder.glob("*.pth")) == ["checkpoint_best.pth", "checkpoint_final.pth"]
    assert len(list(folder.glob("training_log_*.txt"))) == 1  # one log: rank 0's
    assert (folder / "progress.png").is_file() and (folder / "validation_metrics.json").is_file()
    first = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert first["current_epoch"] == 1

    # torchrun #2: both ranks resume from that checkpoint and train one more epoch.
    torchrun(["-m", "spinediff.run.train", *TRAIN, "--epochs", "2", "--c"], translation_env)
    final = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert final["current_epoch"] == 2 and len(final["logging"]["train_losses"]) == 2
    assert final["logging"]["train_losses"][0] == first["logging"]["train_losses"][0]  # history kept
    logs = sorted(folder.glob("training_log_*.txt"))
    assert len(logs) == 2
    for log in logs:  # each launch ends by comparing every parameter with rank 0's
        assert re.search(r"Parameters on the 2 ranks: largest difference to rank 0 = 0\s*$", log.read_text(), re.M)


def test_distributed_flag_without_torchrun_prints_the_command(translation_env, monkeypatch, capsys):
    from spinediff.cli import main

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["train", *TRAIN, "--epochs", "3", "--distributed"]) == SpineDiffError.exit_code
    message = capsys.readouterr().err
    assert ("torchrun --nproc-per-node 2 -m spinediff.run.train --dataset 902 --configuration 2d_diffusion "
            "--fold 0 --epochs 3 --iters-per-epoch 2 --val-iters-per-epoch 1 --steps 1") in message
    assert main(["train", *TRAIN, "-tr", "nnUNetTrainer", "--distributed"]) == SpineDiffError.exit_code
    assert "-num_gpus" in capsys.readouterr().err
