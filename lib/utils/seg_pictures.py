"""Segmentation predictions as files: label PNGs a benchmark server takes, colour PNGs and comparison panels.

- Label PNGs hold, per pixel, the value the dataset's own label files use: for ``DATASET.LABEL_MAPPING
  cityscapes`` the Cityscapes label id of the predicted trainId (``cityscapesscripts``' ``trainId2label``), the
  format of the Cityscapes test server; for ``none`` the class id itself. Like locuslab/mdeq's ``save_pred``
  they are palette ("P") PNGs whose pixel values are those ids, with the PASCAL VOC colour map as palette.
- Colour PNGs: the predicted class colours (Cityscapes' official colours for its trainIds, else the VOC map).
- Panels: image | ground truth | prediction | errors, side by side at the label's resolution; the image is the
  loader's normalised tensor mapped back with its mean and std; errors are red where the prediction is wrong,
  white where right and black where the label is ignored.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from deqlab.data.vision import IMAGENET_MEAN, IMAGENET_STD

WRONG, RIGHT, IGNORED = (220, 20, 20), (255, 255, 255), (0, 0, 0)


def voc_colours() -> np.ndarray:
    """(256, 3) uint8: the PASCAL VOC colour map (bits 0/1/2 of each octal digit of i -> high bits of r/g/b)."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        bits = i
        for shift in range(7, -1, -1):
            for channel in range(3):
                colours[i, channel] |= ((bits >> channel) & 1) << shift
            bits >>= 3
    return colours


def class_colours(mapping: str) -> np.ndarray:
    """(256, 3) uint8 colours of the training classes (index = trainId / class id)."""
    if mapping == "cityscapes":
        from cityscapesscripts.helpers.labels import trainId2label
        colours = np.zeros((256, 3), dtype=np.uint8)
        for train_id, label in trainId2label.items():
            if 0 <= train_id < 255:
                colours[train_id] = label.color
        return colours
    return voc_colours()


def inverse_label_lut(mapping: str) -> np.ndarray:
    """(256,) uint8 from a training class to the value the dataset's label PNGs store (see the module doc)."""
    lut = np.arange(256, dtype=np.uint8)
    if mapping == "cityscapes":
        from cityscapesscripts.helpers.labels import trainId2label
        lut[:] = 0  # "unlabeled": no prediction is ever outside the trainIds
        for train_id, label in trainId2label.items():
            if 0 <= train_id < 255:
                lut[train_id] = label.id
    return lut


def label_png(pred: np.ndarray, mapping: str) -> Image.Image:
    """The palette PNG of a (H, W) prediction of training classes, pixel values = the dataset's label values."""
    image = Image.fromarray(inverse_label_lut(mapping)[pred.astype(np.uint8)], mode="P")
    image.putpalette(voc_colours().reshape(-1).tolist())
    return image


def colourise(classes: np.ndarray, colours: np.ndarray, ignore_label: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 colours of (H, W) class ids; ``ignore_label`` pixels black."""
    rgb = colours[np.clip(classes, 0, 255).astype(np.uint8)]
    if ignore_label is not None:
        rgb[classes == ignore_label] = IGNORED
    return rgb


def denormalise(image: torch.Tensor) -> np.ndarray:
    """(H, W, 3) uint8 RGB of the loader's (3, H, W) ImageNet-normalised image."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (image.float().cpu() * std + mean).clamp(0, 1) * 255
    return rgb.round().byte().permute(1, 2, 0).numpy()


def panel(image: torch.Tensor, label: np.ndarray, pred: np.ndarray, colours: np.ndarray,
          ignore_label: int) -> Image.Image:
    """image | ground truth | prediction | errors, each the size of ``label`` (the image resized to it)."""
    h, w = label.shape
    picture = Image.fromarray(denormalise(image))
    if picture.size != (w, h):
        picture = picture.resize((w, h), Image.BILINEAR)
    errors = np.where((pred == label)[..., None], np.array(RIGHT, np.uint8), np.array(WRONG, np.uint8))
    errors[label == ignore_label] = IGNORED
    panes = [np.asarray(picture), colourise(label, colours, ignore_label), colourise(pred, colours), errors]
    return Image.fromarray(np.concatenate(panes, axis=1))
