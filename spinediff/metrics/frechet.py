"""A Fréchet distance between sets of images that needs no download: features of a segmenter trained here.

FID (Heusel et al. 2017) compares the Gaussian fits of two sets of feature vectors. The usual Inception network
is an ImageNet model that cannot be downloaded on an offline machine and has never seen a CT. Here the features
come from the encoder of a segmentation network we train ourselves on the real images of the target modality
(the downstream CT segmenter of :mod:`spinediff.experiments.downstream`, nnU-Net's own trainer): the global
average of its deepest encoder stage, for every sliding window (nnU-Net's positions, step 0.5) of every 2D slice
(2D configurations) or of the 3D volume. The images are preprocessed exactly as that segmenter's plans say
(nnU-Net's ``DefaultPreprocessor``: transpose, crop, normalise, resample), so the features see what the
segmenter saw in training. The distance itself is monai's ``FIDMetric``.

The numbers depend on the encoder (its training data, configuration and fold): compare methods only under the
same encoder, as the translation and generation benchmarks do.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from spinediff.errors import SpineDiffError


class SegmenterFeatures:
    """Feature vectors of images from a trained nnU-Net segmenter's encoder.

    Args:
        model_folder: the segmenter's ``TRAINER__PLANS__CONFIG`` results folder.
        fold: whose ``checkpoint_final.pth`` is the encoder.
        batch_size: windows per forward pass.
    """

    def __init__(self, model_folder: str | Path, fold: int | str = 0, batch_size: int = 16,
                 device: str | torch.device = "cpu") -> None:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        model_folder = Path(model_folder)
        if not (model_folder / f"fold_{fold}" / "checkpoint_final.pth").is_file():
            raise SpineDiffError(f"{model_folder / f'fold_{fold}'} has no checkpoint_final.pth: train the segmenter "
                                 "whose encoder gives the features first.")
        self.device = torch.device(device)
        predictor = nnUNetPredictor(device=self.device, perform_everything_on_device=False, verbose=False,
                                    verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=(fold,),
                                                       checkpoint_name="checkpoint_final.pth")
        self.predictor = predictor
        self.encoder = getattr(predictor.network, "encoder", None)
        if self.encoder is None:
            raise SpineDiffError(f"The network of {model_folder} has no encoder (expected nnU-Net's U-Nets).")
        self.encoder.to(self.device).eval()
        self.patch_size = tuple(int(p) for p in predictor.configuration_manager.patch_size)
        self.batch_size = int(batch_size)

    def preprocess(self, image: str | Path) -> np.ndarray:
        """``(C, *spatial)`` float32: the image as the segmenter's plans preprocess it."""
        manager, configuration = self.predictor.plans_manager, self.predictor.configuration_manager
        preprocessor = configuration.preprocessor_class(verbose=False)
        data, _, _ = preprocessor.run_case([str(image)], None, manager, configuration, self.predictor.dataset_json)
        return np.asarray(data, dtype=np.float32)

    def windows(self, data: torch.Tensor) -> Iterable[torch.Tensor]:
        """Patch-sized windows (padded where the image is smaller) of a ``(C, *spatial)`` volume: of each slice of the
        first axis for a 2D segmenter, of the volume for a 3D one."""
        from acvl_utils.cropping_and_padding.padding import pad_nd_image
        from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

        planes = [data[:, z] for z in range(data.shape[1])] if len(self.patch_size) == 2 else [data]
        for plane in planes:
            padded = pad_nd_image(plane, self.patch_size, "constant", {"value": 0}, False)
            starts = compute_steps_for_sliding_window(tuple(padded.shape[1:]), self.patch_size, 0.5)
            for corner in itertools.product(*starts):
                yield padded[(slice(None), *(slice(s, s + p) for s, p in zip(corner, self.patch_size, strict=True)))]

    @torch.no_grad()
    def features(self, image: str | Path) -> torch.Tensor:
        """``(windows, features)``: the global average of the deepest encoder stage for every window of ``image``."""
        data = torch.from_numpy(self.preprocess(image))
        vectors, batch = [], []
        for window in itertools.chain(self.windows(data), [None]):
            if window is not None:
                batch.append(window)
            if batch and (window is None or len(batch) == self.batch_size):
                skips = self.encoder(torch.stack(batch).to(self.device))
                deepest = skips[-1] if isinstance(skips, (list, tuple)) else skips
                vectors.append(deepest.float().mean(dim=tuple(range(2, deepest.ndim))).cpu())
                batch = []
        return torch.cat(vectors)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """The Fréchet distance between the Gaussian fits of two ``(N, F)`` feature sets (monai's ``FIDMetric``)."""
    from monai.metrics import FIDMetric

    for name, f in (("first", features_a), ("second", features_b)):
        if f.ndim != 2 or f.shape[0] < 2:
            raise SpineDiffError(f"The {name} feature set needs shape (N >= 2, features), got {tuple(f.shape)}.")
    return float(FIDMetric()(features_a.double(), features_b.double()))


def image_frechet_distance(extractor: SegmenterFeatures, images_a: Iterable[str | Path],
                           images_b: Iterable[str | Path]) -> float:
    """The Fréchet distance between two sets of image files (e.g. synthetic and real CT) in ``extractor``'s
    feature space; every window of every image is one sample of its set."""
    a = torch.cat([extractor.features(p) for p in images_a])
    b = torch.cat([extractor.features(p) for p in images_b])
    return frechet_distance(a, b)
