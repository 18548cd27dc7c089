"""Undo nnU-Net's preprocessing (resampling, cropping, transposition) for images and write them.

nnunetv2 ships this for segmentations (``export_prediction_from_logits``); a translated CT or a
generated image is continuous, so it is resampled with the configuration's *data* resampling
function, placed back into the uncropped volume (outside the crop: ``fill_value``, e.g. air), and
written with the geometry (spacing, origin, direction) of the raw input.
"""

from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

from spinediff.io import write_image


def revert_image_preprocessing(image: np.ndarray | torch.Tensor, plans_manager, configuration_manager,
                               properties: dict, fill_value: float, resampling: str = "data") -> np.ndarray:
    """``(C, *preprocessed_spatial)`` → ``(C, *raw_spatial)`` in the raw file's axis order.

    ``resampling``: ``data`` resamples as the plans resample images (nnU-Net: cubic in plane); ``probabilities`` as
    they resample class probabilities (linear), for derived maps such as uncertainty, which are cheaper that way and
    never overshoot."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image, dtype=np.float32)
    spacing_transposed = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    shape_after_crop = properties["shape_after_cropping_and_before_resampling"]
    current_spacing = configuration_manager.spacing if len(configuration_manager.spacing) == len(shape_after_crop) \
        else [spacing_transposed[0], *configuration_manager.spacing]
    resample = {"data": configuration_manager.resampling_fn_data,
                "probabilities": configuration_manager.resampling_fn_probabilities}[resampling]
    resampled = resample(image, shape_after_crop, current_spacing, spacing_transposed)
    resampled = np.asarray(resampled, dtype=np.float32)
    full = np.full((image.shape[0], *properties["shape_before_cropping"]), fill_value, dtype=np.float32)
    for channel in range(image.shape[0]):
        full[channel] = insert_crop_into_image(full[channel], resampled[channel], properties["bbox_used_for_cropping"])
    return full.transpose([0] + [i + 1 for i in plans_manager.transpose_backward])


def image_from_array_like_raw(array: np.ndarray, properties: dict) -> sitk.Image:
    """A SimpleITK image with the raw input's geometry (nnU-Net's ``sitk_stuff`` properties).

    ``array`` is one channel in nnU-Net's raw axis order (2D data as ``(1, y, x)``).
    """
    stuff = properties["sitk_stuff"]
    if len(stuff["spacing"]) == 2:
        array = array[0]
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(stuff["spacing"])
    image.SetOrigin(stuff["origin"])
    image.SetDirection(stuff["direction"])
    if "original_orientation" in stuff:  # SimpleITKIOWithReorient
        image = sitk.DICOMOrient(image, stuff["original_orientation"])
    return image


def write_image_like_raw(array: np.ndarray, properties: dict, target: str | os.PathLike,
                         dtype=np.float32) -> None:
    """Write one channel atomically with the raw input's geometry."""
    image = image_from_array_like_raw(np.asarray(array).astype(dtype, copy=False), properties)
    write_image(image, target)
