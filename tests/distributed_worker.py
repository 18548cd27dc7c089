"""What each rank runs in ``tests/test_distributed.py`` (started by torchrun; not a test module itself).

1. Fixed batches: a ``DiffusionTranslationTrainer`` (fold 1) under DDP takes ``--steps`` training
   steps on this rank's share of fixed global batches (:func:`run_fixed_steps`, also used by the test
   for the single-process reference), then one validation step; it saves its losses, the logged
   validation loss, its parameters and EMA weights to ``OUT/rank{R}.pt``.
2. With ``--train ARGS``: ``spinediff.run.train`` with ARGS in the same processes (they already
   paid ~12 s each for importing torch and nnU-Net), counting this rank's ``torch.save`` calls into
   ``OUT/rank{R}_saves.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

DATASET = 902
CONFIGURATION = "2d_diffusion"
FIXED_FOLD = 1


def fixed_global_batch(step: int, batch_size: int, channels: int, patch: list[int]) -> dict:
    """The step's global batch: two MR-like channels and a CT channel in HU (what the translation task
    reads), and an empty label map; the same tensors for every run of the test."""
    generator = torch.Generator().manual_seed(10_000 + step)
    data = torch.randn(batch_size, channels, *patch, generator=generator)
    data[:, -1] = torch.rand(batch_size, *patch, generator=generator) * 2000 - 1024
    return {"data": data, "target": torch.zeros(batch_size, 1, *patch, dtype=torch.int16)}


def use_per_sample_noise(trainer, first_index: int, step: list[int]) -> None:
    """Timesteps and noise drawn per sample from a seed of (step, global sample index).

    The trainer draws them for its whole local batch from its own generator, so a rank holding
    samples 2-3 would draw other noise than one process holding 0-3. Seeding per sample makes the
    noise part of the fixed input, like the images; the real ``prepare_training_batch`` still runs.
    """
    from spinediff.diffusion.process import TrainingBatch

    prepare = trainer.process.prepare_training_batch

    def per_sample(condition: torch.Tensor, target: torch.Tensor, generator: torch.Generator,
                   mask: torch.Tensor | None = None) -> TrainingBatch:
        parts = [prepare(condition[j:j + 1], target[j:j + 1],
                         torch.Generator().manual_seed(1000 * step[0] + first_index + j),
                         None if mask is None else mask[j:j + 1]) for j in range(len(target))]
        fields = [[getattr(p, f.name) for p in parts] for f in dataclasses.fields(TrainingBatch)]
        return TrainingBatch(*[None if values[0] is None else torch.cat(values) for values in fields])

    trainer.process.prepare_training_batch = per_sample


def run_fixed_steps(trainer, steps: int, first_index: int) -> dict:
    """``steps`` calls of ``trainer.train_step`` on samples ``first_index:first_index + trainer.batch_size``
    of the fixed global batches, then one validation step and ``on_validation_epoch_end``."""
    global_batch = trainer.configuration_manager.batch_size
    channels = len(trainer.dataset_json["channel_names"])
    patch = list(trainer.configuration_manager.patch_size)
    step = [0]
    use_per_sample_noise(trainer, first_index, step)
    part = slice(first_index, first_index + trainer.batch_size)
    losses = []
    trainer.network.train()
    for k in range(steps):
        step[0] = k
        batch = fixed_global_batch(k, global_batch, channels, patch)
        losses.append(float(trainer.train_step({key: value[part] for key, value in batch.items()})["loss"]))
    step[0] = steps
    batch = fixed_global_batch(steps, global_batch, channels, patch)
    with torch.no_grad():
        outputs = trainer.validation_step({key: value[part] for key, value in batch.items()})
        trainer.on_validation_epoch_end([outputs])
    return {"losses": losses, "val_loss": trainer.logger.get_value("val_losses", step=-1),
            "val_ssim": trainer.logger.get_value("val_ssim", step=-1)}


def flat_weights(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in module.state_dict().values() if t.is_floating_point()])


def build_fixed_trainer():
    """The trainer of the fixed-batch runs, with weights initialised from torch seed 0 (on every rank;
    DDP would copy rank 0's anyway)."""
    from spinediff.training.api import build_trainer

    trainer = build_trainer(DATASET, CONFIGURATION, FIXED_FOLD, "DiffusionTranslationTrainer")
    torch.manual_seed(0)
    trainer.initialize()
    return trainer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--train", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args()
    out = Path(args.out)

    from spinediff.run import train as run_train
    from spinediff.training import distributed

    with distributed.process_group("cpu"):
        rank = distributed.rank()
        if args.steps:
            trainer = build_fixed_trainer()
            result = run_fixed_steps(trainer, args.steps, first_index=rank * trainer.batch_size)
            torch.save({**result, "batch_size": trainer.batch_size, "world_size": distributed.world_size(),
                        "generator_seed": trainer.generator.initial_seed(),
                        "data_seed": distributed.seed_for_rank(trainer.data_seed),
                        "weights": flat_weights(trainer.plain_network),
                        "ema": flat_weights(trainer.ema.module)}, out / f"rank{rank}.pt")
        if not args.train:
            return 0
        saves = []
        save = torch.save

        def counting_save(obj, f, *a, **k):
            saves.append(str(f))
            return save(obj, f, *a, **k)

        torch.save = counting_save  # trainers call torch.save for every checkpoint
        try:
            code = run_train.main(args.train)  # uses the process group that is already there
        finally:
            torch.save = save
        (out / f"rank{rank}_saves.json").write_text(json.dumps(saves))
        return code


if __name__ == "__main__":
    sys.exit(main())
