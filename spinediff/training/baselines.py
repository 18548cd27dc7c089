"""Baselines on the same network, data and harness: one-step regression and Pix2Pix (CUT, unpaired:
:mod:`spinediff.training.unpaired`; nnsyn's masked regression with a perception loss:
:mod:`spinediff.training.perception`).

``RegressionTrainer`` is the "one-step" baseline diffusion must beat: the same U-Net, fed the
condition only (timestep fixed at 0), trained with L1 to output the target directly.
``Pix2PixTrainer`` adds a PatchGAN discriminator and the adversarial loss (Isola et al. 2017).
nnU-Net's own ``nnUNetTrainer`` is the segmentation baseline, untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from spinediff.tasks import Generation, Translation
from spinediff.training.base import SpineDiffTrainer
from spinediff.training.distributed import average_gradients, broadcast_parameters
from spinediff.utilities.precision import as_float32, autocast


class RegressionTrainer(SpineDiffTrainer):
    """One step from the condition to the target; predicts through the base's core with no diffusion process."""

    supported_tasks = (Translation, Generation)
    denoising = False

    def direct(self, network: nn.Module, condition: torch.Tensor) -> torch.Tensor:
        timesteps = torch.zeros(condition.shape[0], dtype=torch.long, device=condition.device)
        with autocast(self.device, self.amp_dtype):
            return as_float32(network(condition, timesteps))

    def compute_loss(self, network, condition, target):
        return torch.nn.functional.l1_loss(self.direct(network, condition), target)


def patch_discriminator(in_channels: int, dimension: int, features: int = 32, layers: int = 3) -> nn.Module:
    """PatchGAN: strided convolutions → one real/fake logit per receptive field (70 px for 3 layers)."""
    conv = nn.Conv2d if dimension == 2 else nn.Conv3d
    blocks: list[nn.Module] = [conv(in_channels, features, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
    channels = features
    for i in range(1, layers):
        out = min(features * 2**i, 8 * features)
        blocks += [conv(channels, out, 4, 2 if i < layers - 1 else 1, 1), nn.GroupNorm(min(8, out), out),
                   nn.LeakyReLU(0.2, inplace=True)]
        channels = out
    blocks.append(conv(channels, 1, 3, 1, 1))
    return nn.Sequential(*blocks)


class DiscriminatorMixin:
    """A PatchGAN discriminator, its optimiser, the least-squares GAN loss and their checkpoint state, for the
    adversarial baselines (Pix2Pix: conditional, on (condition, image) pairs; CUT: unconditional, on images)."""

    def initialize_discriminator(self, in_channels: int) -> None:
        dimension = len(self.configuration_manager.patch_size)
        self.discriminator = patch_discriminator(in_channels, dimension).to(self.device)
        broadcast_parameters(self.discriminator)  # DDP wraps only the generator: start all ranks alike
        self.discriminator_optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=self.initial_lr,
                                                         betas=(0.5, 0.999))

    def _discriminate(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.amp_dtype):
            return as_float32(self.discriminator(images))

    @staticmethod
    def _adversarial(logits: torch.Tensor, real: bool) -> torch.Tensor:
        return torch.mean((logits - (1.0 if real else 0.0)) ** 2)

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        """One step of the discriminator: ``real`` → 1, ``fake`` (detached here) → 0."""
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        loss = 0.5 * (self._adversarial(self._discriminate(real), True)
                      + self._adversarial(self._discriminate(fake.detach()), False))
        # average_gradients: no-op in a single process
        self.backward_and_step(loss, self.discriminator_optimizer,
                               before_step=lambda: average_gradients(self.discriminator))

    def extra_checkpoint_state(self) -> dict:
        return {"discriminator_weights": self.discriminator.state_dict(),
                "discriminator_optimizer_state": self.discriminator_optimizer.state_dict()}

    def load_extra_checkpoint_state(self, checkpoint: dict) -> None:
        if "discriminator_weights" in checkpoint:
            self.discriminator.load_state_dict(checkpoint["discriminator_weights"])
            self.discriminator_optimizer.load_state_dict(checkpoint["discriminator_optimizer_state"])


class Pix2PixTrainer(DiscriminatorMixin, RegressionTrainer):
    """U-Net generator (the shared network) + PatchGAN discriminator, L1 (weight 100) + least-squares GAN loss."""

    l1_weight = 100.0

    def initialize(self) -> None:
        super().initialize()
        self.initialize_discriminator(self.task.condition_channels + self.task.output_channels)

    def train_step(self, batch: dict) -> dict:
        condition, target = self.split_batch(batch)
        fake = self.direct(self.network, condition)
        # discriminator: real pairs → 1, generated pairs → 0
        self.discriminator_step(torch.cat([condition, target], 1), torch.cat([condition, fake], 1))
        # generator: fool the discriminator and stay close to the target
        self.optimizer.zero_grad(set_to_none=True)
        g_adv = self._adversarial(self._discriminate(torch.cat([condition, fake], 1)), True)
        loss = self.l1_weight * torch.nn.functional.l1_loss(fake, target) + g_adv
        self.backward_and_step(loss, self.optimizer, self.network.parameters())
        self.ema.update(self.plain_network)
        return {"loss": loss.detach().cpu().numpy()}

    def compute_loss(self, network, condition, target):
        return self.l1_weight * torch.nn.functional.l1_loss(self.direct(network, condition), target)
