"""Unpaired translation: CUT (contrastive unpaired translation, Park et al., ECCV 2020), the unpaired GAN baseline
of Graf et al. 2023, and an unpaired diffusion baseline (SDEdit-style re-noising of the histogram-matched MR by a CT
diffusion model; :class:`UnpairedDiffusionTrainer`).

``CUTTrainer`` never compares a synthetic CT with the CT of its own MR. Its generator (the shared U-Net, one step,
as :class:`~spinediff.training.baselines.RegressionTrainer`) learns from two signals only:

* **adversarial** (least-squares GAN, PatchGAN discriminator on images alone): synthetic CT patches vs real CT
  patches of **other cases** — the real CT of each step is the batch of the *previous* step (nnU-Net's loader draws
  cases at random), so an MR and its own CT never meet in a loss;
* **PatchNCE**: at every encoder stage of the generator, the feature of a location of the synthetic CT must match the
  feature of the same location of its MR better than the features of other locations of that MR (InfoNCE over
  :attr:`CUTTrainer.nce_patches` sampled locations, a two-layer projection head per stage, temperature 0.07). The
  identity term of CUT applies the same loss to a real CT and the generator's output for it.

Differences from the reference CUT: the generator is our U-Net, not a ResNet; the layers compared are the U-Net's
encoder stages; where the source has several channels (e.g. T1w and T2w) and the target one, a CT enters the encoder
in every source channel; the validation loss (a monitor, not a training signal) is the paired L1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spinediff.diffusion.unpaired import HISTOGRAM_BINS, source_as_estimate, target_histogram
from spinediff.errors import SpineDiffError
from spinediff.tasks import Translation
from spinediff.training.base import CUDA, SpineDiffTrainer
from spinediff.training.baselines import DiscriminatorMixin, RegressionTrainer
from spinediff.training.distributed import average_gradients, broadcast_parameters
from spinediff.utilities.precision import as_float32, autocast


def projection_head(channels: int, features: int) -> nn.Module:
    return nn.Sequential(nn.Linear(channels, features), nn.ReLU(inplace=True), nn.Linear(features, features))


def patch_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE between ``(B, N, F)`` queries and keys of the same N locations (positives on the diagonal; the other
    locations of the same image are the negatives). Keys are constants."""
    queries = F.normalize(queries, dim=-1)
    keys = F.normalize(keys.detach(), dim=-1)
    logits = torch.bmm(queries, keys.transpose(1, 2)) / temperature  # (B, N, N)
    labels = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


class CUTTrainer(DiscriminatorMixin, RegressionTrainer):
    """Contrastive unpaired translation: LSGAN + PatchNCE (weight 1) + PatchNCE identity, trained unpaired."""

    supported_tasks = (Translation,)
    nce_weight = 1.0
    nce_temperature = 0.07
    nce_patches = 256
    head_features = 256

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = CUDA) -> None:
        # nnU-Net records the constructor's arguments by name: keep its exact signature.
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._unpaired_targets: torch.Tensor | None = None

    def initialize(self) -> None:
        super().initialize()
        if self.task.condition_channels != self.task.output_channels and self.task.output_channels != 1:
            raise SpineDiffError(
                f"CUT passes the synthetic image through the generator's encoder, so it needs as many source as "
                f"target channels, or one target channel (placed in every source channel); this dataset has "
                f"{self.task.condition_channels} and {self.task.output_channels}.")
        self.initialize_discriminator(self.task.output_channels)
        features = self.configuration_manager.network_arch_init_kwargs["features_per_stage"]
        self.heads = nn.ModuleList(projection_head(int(c), self.head_features) for c in features).to(self.device)
        broadcast_parameters(self.heads)
        # one optimiser (and one gradient scaler) for the generator and its heads; the poly schedule decays both
        self.optimizer.add_param_group({"params": list(self.heads.parameters())})

    def as_source(self, images: torch.Tensor) -> torch.Tensor:
        """Target-modality images as generator input: a single target channel fills every source channel."""
        if images.shape[1] == self.task.condition_channels:
            return images
        return images.expand(-1, self.task.condition_channels, *images.shape[2:])

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        images = self.as_source(images)
        network = self.plain_network
        timesteps = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
        with autocast(self.device, self.amp_dtype):
            return [as_float32(f) for f in network.encode(images, timesteps)]

    def nce_loss(self, source: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """PatchNCE between the generator's encoder features of ``source`` (keys) and of ``output`` (queries)."""
        terms = []
        for head, keys, queries in zip(self.heads, self.encode(source), self.encode(output), strict=True):
            keys, queries = keys.flatten(2).transpose(1, 2), queries.flatten(2).transpose(1, 2)  # (B, N, C)
            if keys.shape[1] < 2:
                continue
            count = min(self.nce_patches, keys.shape[1])
            chosen = torch.randperm(keys.shape[1], generator=self.generator, device=self.generator.device)[:count]
            chosen = chosen.to(keys.device)
            terms.append(patch_nce(head(queries[:, chosen]), head(keys[:, chosen]), self.nce_temperature))
        return torch.stack(terms).mean()

    def unpaired_targets(self, target: torch.Tensor) -> torch.Tensor:
        """Real target images of other cases: the previous step's batch (the first step: the batch rolled by one)."""
        previous = self._unpaired_targets
        self._unpaired_targets = target.detach()
        if previous is None or previous.shape != target.shape:
            return target.roll(1, dims=0)
        return previous

    def train_step(self, batch: dict) -> dict:
        condition, target = self.split_batch(batch)
        real = self.unpaired_targets(target)
        network = self.plain_network  # forward passes and encoder calls outside DDP: gradients averaged below
        fake = self.direct(network, condition)
        self.discriminator_step(real, fake)
        self.optimizer.zero_grad(set_to_none=True)
        identity = self.direct(network, self.as_source(real))
        nce = 0.5 * (self.nce_loss(condition, fake) + self.nce_loss(real, identity))
        loss = self._adversarial(self._discriminate(fake), True) + self.nce_weight * nce

        def synchronise() -> None:
            average_gradients(network)
            average_gradients(self.heads)

        self.backward_and_step(loss, self.optimizer, network.parameters(), before_step=synchronise)
        self.ema.update(network)
        return {"loss": loss.detach().cpu().numpy()}

    def extra_checkpoint_state(self) -> dict:
        return {**super().extra_checkpoint_state(), "nce_heads": self.heads.state_dict()}

    def load_extra_checkpoint_state(self, checkpoint: dict) -> None:
        super().load_extra_checkpoint_state(checkpoint)
        if "nce_heads" in checkpoint:
            self.heads.load_state_dict(checkpoint["nce_heads"])


class UnpairedDiffusionTrainer(SpineDiffTrainer):
    """Unpaired diffusion (SDEdit): a CT diffusion model trained on the CT alone (condition held at zero), which
    translates an MR by denoising it, histogram-matched to the training CT and noised to :attr:`start` × T
    (:mod:`spinediff.diffusion.unpaired`). The only thing it learns about the MR side is nothing: the pairing is never
    used, and the CT's intensity distribution is gathered from the training targets as a marginal.

    How it differs from SynDiff (Graf et al.'s unpaired diffusion baseline): no adversarial diffusion, no cycle
    consistency and no second (CT → MR) model; the MR's anatomy reaches the CT only through the partial noising.
    """

    supported_tasks = (Translation,)
    start = 0.5  # the fraction of T the histogram-matched MR is noised to: less keeps the MR, more the CT model

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = CUDA) -> None:
        # nnU-Net records the constructor's arguments by name: keep its exact signature.
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.target_histogram = torch.zeros(HISTOGRAM_BINS)

    def compute_loss(self, network, condition, target):
        if network is self.network:  # training batches only: the CT distribution the MR is matched to
            self.target_histogram += target_histogram(target)
        return super().compute_loss(network, torch.zeros_like(condition), target)

    def make_predictor(self, **options):
        options.setdefault("sdedit", (self.start, self.task.output_channels))
        return super().make_predictor(**options)

    def as_estimate(self, condition: torch.Tensor) -> torch.Tensor:
        histogram = self.target_histogram if self.target_histogram.sum() > 0 else torch.ones(HISTOGRAM_BINS)
        return source_as_estimate(condition, histogram, self.task.output_channels)

    def predict_patches(self, condition: torch.Tensor, num_inference_steps: int, seed: int = 0) -> torch.Tensor:
        mapped = torch.stack([self.as_estimate(c) for c in condition])
        return super().predict_patches(mapped, num_inference_steps, seed)

    def extra_checkpoint_state(self) -> dict:
        # read by spinediff predict (FoldModel) as well as on resuming
        return {"sdedit": {"start": float(self.start), "target_histogram": self.target_histogram.clone()}}

    def load_extra_checkpoint_state(self, checkpoint: dict) -> None:
        if "sdedit" in checkpoint:
            self.target_histogram = checkpoint["sdedit"]["target_histogram"].detach().cpu().float().clone()
