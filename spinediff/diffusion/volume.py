"""The one prediction core: a trained network's estimate of a whole preprocessed volume.

The trainers' validation (``SpineDiffTrainer.predict_volume`` / ``predict_patches``) and ``spinediff predict``
(``FoldModel.predict``) both predict through :class:`VolumePredictor`. A diffusion model samples with the
:class:`~spinediff.diffusion.sampler.SlidingWindowSampler`; a one-step model (regression and Pix2Pix
baselines: ``network(condition, t=0)``) goes through monai's ``sliding_window_inference`` (Gaussian
blending, 50 % overlap). Both mirror with :func:`~spinediff.diffusion.sampler.mirrored`, and a 2D model
predicts a 3D volume slice by slice along its first spatial axis, slice z seeded ``seed + z``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from spinediff.diffusion.process import DiffusionProcess
from spinediff.diffusion.sampler import SlidingWindowSampler, mirrored


class VolumePredictor:
    """x0 estimates in [-1, 1] of whole volumes, for diffusion and one-step models.

    Args:
        network: a denoiser ``network(cat([condition, x_t]), timesteps)``, or with ``process`` None a one-step
            model ``network(condition, 0)``.
        process: the diffusion process the network was trained with; None for a one-step model.
        patch_size: spatial window size, the plans' patch size.
        window_batch_size: windows per network call.
        mirror_axes: spatial axes (0-based) for mirroring test-time augmentation (all flip combinations).
        eta: DDIM stochasticity (diffusion only).
        solver: ``ddim``, ``dpm++2m`` or ``unipc`` (diffusion only; see the sampler module).
        warm_start: None, or the fraction of T to start sampling from (see :meth:`warm_started`).
        sdedit: ``(start, target_channels)`` for unpaired diffusion (:mod:`spinediff.diffusion.unpaired`): the
            condition's first ``target_channels`` channels are the initial estimate, noised to ``start`` × T and
            denoised with a zero condition (see :meth:`re_noised`).
        sample_batch_size: ensemble members denoised together (diffusion only).
        device: where to predict; default the network's device.
    """

    def __init__(
        self,
        network: nn.Module,
        *,
        process: DiffusionProcess | None,
        patch_size: Sequence[int],
        window_batch_size: int,
        mirror_axes: Sequence[int] = (),
        eta: float = 0.0,
        sample_batch_size: int = 1,
        device: torch.device | str | None = None,
        solver: str = "ddim",
        warm_start: float | None = None,
        sdedit: tuple[float, int] | None = None,
    ) -> None:
        self.network = network
        self.patch_size = tuple(int(p) for p in patch_size)
        self.window_batch_size = int(window_batch_size)
        self.mirror_axes = tuple(int(a) for a in mirror_axes)
        self.device = torch.device(device) if device is not None else next(network.parameters()).device
        self.sampler = None
        self.warm_start = warm_start
        self.sdedit = sdedit
        if process is not None:
            self.sampler = SlidingWindowSampler(
                network,
                process,
                self.patch_size,
                eta=eta,
                window_batch_size=self.window_batch_size,
                sample_batch_size=sample_batch_size,
                mirror_axes=self.mirror_axes,
                device=self.device,
                solver=solver,
            )

    @property
    def denoising(self) -> bool:
        """True for a diffusion model, False for a one-step model."""
        return self.sampler is not None

    @torch.no_grad()
    def predict(
        self,
        condition: torch.Tensor,
        *,
        num_inference_steps: int,
        num_samples: int = 1,
        seed: int = 0,
        on_slice: Callable[[], object] | None = None,
    ) -> torch.Tensor:
        """``(K, C_out, *spatial)`` estimates of one volume ``(C, *spatial)``, on the CPU.

        A diffusion model draws K samples (see ``SlidingWindowSampler.sample``); a one-step model's single output
        is repeated K times (a view). A 2D patch on a 3D volume predicts every slice of the first axis on its own,
        seeded ``seed + z``. ``num_inference_steps`` is ignored by a one-step model. ``on_slice`` (progress) is
        called after each slice (2D) or once after the volume (3D).
        """
        self.network.eval()
        condition = condition.to(self.device)
        members = num_samples if self.denoising else 1
        if len(self.patch_size) == 2 and condition.ndim == 4:
            slices = []
            for z in range(condition.shape[1]):
                slices.append(self._predict(condition[:, z], num_inference_steps, members, seed + z))
                if on_slice is not None:
                    on_slice()
            volume = torch.stack(slices, dim=2)
        else:
            volume = self._predict(condition, num_inference_steps, members, seed)
            if on_slice is not None:
                on_slice()
        return volume if self.denoising else volume.expand(num_samples, *volume.shape[1:])

    @torch.no_grad()
    def predict_patches(self, batch: torch.Tensor, *, num_inference_steps: int, seed: int = 0) -> torch.Tensor:
        """``(B, C_out, *patch)`` estimates on ``device`` for patch-sized conditions ``(B, C, *patch)`` (the
        trainers' epoch validation): one sample per item seeded ``seed + i``, or the one-step output."""
        self.network.eval()
        batch = batch.to(self.device)
        if self.sampler is None:
            return self.one_step(batch).clamp(-1, 1)
        if self.sdedit is not None:
            return torch.cat([self._predict(c, num_inference_steps, 1, seed + i) for i, c in enumerate(batch)]
                             ).to(self.device)
        samples = [self.sampler.sample(c, 1, generator=seed + i, num_inference_steps=num_inference_steps)
                   for i, c in enumerate(batch)]
        return torch.cat(samples).to(self.device)

    def one_step(self, x: torch.Tensor) -> torch.Tensor:
        """A one-step model's output ``network(x, t=0)`` for a batch ``(B, C, *patch)``, with mirroring."""
        timesteps = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return mirrored(lambda y: self.network(y, timesteps), x, self.mirror_axes)

    def warm_started(self, condition: torch.Tensor, num_inference_steps: int, num_samples: int,
                     seed: int) -> torch.Tensor:
        """SpineSegDiff's warm start without a second model: one network call from pure noise gives an x0 estimate
        (for segmentation, class probabilities); every member starts from it noised to ``warm_start * (T - 1)``
        and takes ``num_inference_steps`` solver steps below that level (1 + steps calls per sample, the first
        shared by the members)."""
        start, scheduled = self._below(self.warm_start, num_inference_steps)
        estimate = self.sampler.sample(condition, 1, generator=seed, num_inference_steps=1)[0]
        return self.sampler.sample(condition, num_samples, generator=seed, num_inference_steps=scheduled,
                                   initial_estimate=estimate, start_timestep=start)

    def _below(self, fraction: float, num_inference_steps: int) -> tuple[int, int]:
        """The start timestep ``fraction`` × (T - 1) and the length of the solver's schedule that has
        ``num_inference_steps`` timesteps at or below it."""
        sampler = self.sampler
        total = sampler.process.num_train_timesteps
        start = int(round(fraction * (total - 1)))
        scheduled = num_inference_steps
        while scheduled < total - 1:
            sampler.solver.set_timesteps(scheduled, sampler.device)
            if sum(t <= start for t in sampler.solver.timesteps) >= num_inference_steps:
                break
            scheduled += 1
        return start, scheduled

    def re_noised(self, condition: torch.Tensor, num_inference_steps: int, num_samples: int,
                  seed: int) -> torch.Tensor:
        """Unpaired diffusion (SDEdit): the estimate in the condition's first channels, noised to the start
        timestep and denoised in ``num_inference_steps`` steps by the unconditional model (a zero condition)."""
        fraction, channels = self.sdedit
        start, scheduled = self._below(fraction, num_inference_steps)
        return self.sampler.sample(torch.zeros_like(condition), num_samples, generator=seed,
                                   num_inference_steps=scheduled, initial_estimate=condition[:channels],
                                   start_timestep=start)

    def _predict(self, condition: torch.Tensor, num_inference_steps: int, num_samples: int, seed: int) -> torch.Tensor:
        """``(K, C_out, *spatial)`` for a condition whose spatial axes match the patch's."""
        if self.sampler is not None:
            if self.sdedit is not None:
                return self.re_noised(condition, num_inference_steps, num_samples, seed)
            if self.warm_start is not None:
                return self.warm_started(condition, num_inference_steps, num_samples, seed)
            return self.sampler.sample(condition, num_samples, generator=seed, num_inference_steps=num_inference_steps)
        output = sliding_window_inference(condition[None].float(), list(self.patch_size), self.window_batch_size,
                                          self.one_step, overlap=0.5, mode="gaussian", padding_mode="constant")
        return output.clamp(-1, 1).cpu()
