"""Image classification (MDEQ on CIFAR-10, ImageNet, Fashion-MNIST): cross-entropy, top-1/top-5.

With ``LOSS.FPC`` the model also returns the logits of each phantom iterate (``info["trajectory_outputs"]``) and
the training objective (``deqlab.objective``) takes the fixed-point correction of their cross-entropies.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from deqlab.tasks.base import Meter, Task


class TopKMeter(Meter):
    """Correct top-1 and top-5 predictions and the number of samples."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(3, device)

    def update(self, output: Tensor, target: Tensor) -> None:
        top5 = output.topk(min(5, output.shape[1]), dim=1).indices
        self.sums += torch.stack([(top5[:, 0] == target).sum(), (top5 == target[:, None]).any(dim=1).sum(),
                                  torch.tensor(len(target), device=target.device)]).to(self.sums)

    def compute(self, sums: Tensor) -> dict[str, Any]:
        top1, top5, count = sums.tolist()
        count = max(count, 1.0)
        return {"top1": 100 * top1 / count, "top5": 100 * top5 / count}


class ClassificationTask(Task):
    name = "cls"
    best_metric = "top1"
    perf_label = "accuracy (top-1, %)"
    pretrained_exclude = ("classifier.",)  # a new dataset's classes: keep the fresh classifier

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output.float(), target)

    def train_stats(self, output: Tensor, target: Tensor) -> dict[str, float]:
        return {"acc": 100 * (output.argmax(1) == target).float().mean().item()}

    def new_meter(self, device: torch.device) -> Meter:
        return TopKMeter(device)

    def describe(self, metrics: dict[str, Any]) -> str:
        return f"loss {metrics['loss']:.4f} top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f}"
