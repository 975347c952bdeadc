"""DATASET.MEAN / DATASET.STD reach the classification transforms, and bad values are config errors."""
import re

import numpy as np
import pytest
import torch

from deqlab.config import load_config
from deqlab.data import build_dataset
from deqlab.data.imagenet import torchvision_transform
from deqlab.data.vision import CIFAR_MEAN, CIFAR_STD
from deqlab.errors import ConfigError

from conftest import REPO, TINY_OVERRIDES, write_fashion_mnist
from test_data import write_cifar

ZOO_SMALL = REPO / "experiments/cifar/cls_mdeq_zoo_small.yaml"
ZOO_MEAN, ZOO_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def unnormalise(x, mean, std):
    return (x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]) * 255


@pytest.mark.parametrize("overrides, mean, std", [
    ([], ZOO_MEAN, ZOO_STD),                                        # the zoo config sets the zoo's std
    (["DATASET.MEAN", "[]", "DATASET.STD", "[]"], CIFAR_MEAN, CIFAR_STD),  # [] = the dataset's usual one
    (["DATASET.MEAN", "[0.5, 0.25, 0.0]", "DATASET.STD", "[0.1, 0.2, 0.4]"], (0.5, 0.25, 0.0), (0.1, 0.2, 0.4))])
def test_cifar_images_are_normalised_with_the_configured_mean_and_std(tmp_path, overrides, mean, std):
    written = write_cifar(tmp_path / "cifar10")
    cfg = load_config(ZOO_SMALL, ["DATASET.ROOT", str(tmp_path / "cifar10"), *overrides])
    x, _ = build_dataset(cfg, "test")[0]
    raw = torch.from_numpy(written["test_batch"][0][0].reshape(3, 32, 32).astype(np.float32))
    assert torch.allclose(unnormalise(x, mean, std), raw, atol=0.01)


def test_imagenet_and_fashion_transforms_take_the_keys_too(tmp_path):
    cfg = load_config(REPO / "experiments/imagenet/cls_mdeq_zoo_small.yaml",
                      ["DATASET.MEAN", "[0.1, 0.2, 0.3]", "DATASET.STD", "[0.5, 0.6, 0.7]"])
    normalize = torchvision_transform(cfg, augment=False).transforms[-1]
    assert (tuple(normalize.mean), tuple(normalize.std)) == ((0.1, 0.2, 0.3), (0.5, 0.6, 0.7))
    write_fashion_mnist(tmp_path / "data")
    quick = REPO / "experiments/fashion_mnist/cls_mdeq_quickstart.yaml"
    cfg = load_config(quick, TINY_OVERRIDES + ["DATASET.ROOT", str(tmp_path / "data"),
                                               "DATASET.MEAN", "[0.0]", "DATASET.STD", "[1.0]"])
    x, _ = build_dataset(cfg, "test")[0]
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9  # ToTensor's [0, 1], untouched


ONE_PER_CHANNEL = "must be [] (the dataset's usual one) or a list of MODEL.IN_CHANNELS (3) items"


@pytest.mark.parametrize("key, value, expected", [
    ("DATASET.STD", "[0.2, 0.2]", f"DATASET.STD {ONE_PER_CHANNEL}"),
    ("DATASET.STD", "[0.2, 0.0, 0.2]", "each a number > 0, got [0.2, 0.0, 0.2]"),
    ("DATASET.MEAN", "[0.5]", f"DATASET.MEAN {ONE_PER_CHANNEL}")])
def test_bad_mean_or_std_is_a_config_error(key, value, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(ZOO_SMALL, [key, value])
