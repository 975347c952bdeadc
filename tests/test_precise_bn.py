"""Precise BatchNorm: exact recomputed statistics on a tiny model, and eval-mode accuracy early in training."""
import logging
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import REPO, TINY_OVERRIDES, write_fashion_mnist
from torch import nn

from deqlab.config import load_config
from deqlab.engine import Trainer
from deqlab.engine.precise_bn import recompute_bn_stats


def tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5 * 36, 6),
                         nn.BatchNorm1d(6))


def batches(n: int = 5):
    gen = torch.Generator().manual_seed(1)
    return [(3.0 * torch.randn(7, 3, 8, 8, generator=gen) + 2.0, torch.zeros(7)) for _ in range(n)]


def run(model, batch):
    return model(batch[0])


def expected_stats(net: nn.Sequential, data) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The inputs of each BatchNorm, computed by hand: batch statistics inside a batch, no dropout."""
    conv1, bn1, _, _, conv2, bn2, _, fc, _ = net
    inputs = [[], [], []]
    for x, _ in data:
        h1 = conv1(x)
        h2 = conv2(F.relu(F.batch_norm(h1, None, None, bn1.weight, bn1.bias, training=True, eps=bn1.eps)))
        h3 = fc(F.batch_norm(h2, None, None, bn2.weight, bn2.bias, training=True, eps=bn2.eps).flatten(1))
        for store, h in zip(inputs, (h1, h2, h3)):
            store.append(h.transpose(0, 1).reshape(h.shape[1], -1).double())
    return [(torch.cat(s, 1).mean(1), torch.cat(s, 1).var(1, unbiased=True)) for s in inputs]


@torch.no_grad()
def test_recomputed_stats_are_the_exact_population_stats_of_each_layer_input():
    net, data = tiny_net(), batches()
    net.train()
    net[7].train(False)  # a non-BN module's mode must come back as it was
    want = expected_stats(net, data)
    gap = recompute_bn_stats(net, iter(data + data), 5, run)  # only the first 5 batches count
    for bn, (mean, var) in zip((net[1], net[5], net[8]), want):
        assert torch.allclose(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        assert torch.allclose(bn.running_var.double(), var, rtol=1e-5, atol=1e-7)
        assert bn.num_batches_tracked.item() == 0
    assert [m.training for m in net] == [True] * 7 + [False, True]
    assert gap.num_batches == 5 and gap.num_layers == 3 and gap.disagrees  # against the defaults (0, 1)
    # Run again on the same batches: the running statistics now agree with the measured ones...
    again = recompute_bn_stats(net, data, 5, run, update=False)
    assert not again.disagrees and again.var_factor < 1 + 1e-4 and again.mean_shift < 1e-4
    # ...and the gap names the layer whose statistics are off, by how much.
    net[5].running_var.mul_(9.0)
    net[8].running_mean.add_(2.0 * net[8].running_var.sqrt())
    off = recompute_bn_stats(net, data, 5, run, update=False)
    assert off.disagrees and (off.var_layer, off.mean_layer) == ("5", "8")
    assert abs(off.var_factor - 9.0) < 0.01 and abs(off.mean_shift - 2.0) < 0.01


@torch.no_grad()
def test_measuring_without_update_leaves_the_model_unchanged():
    net, data = tiny_net(), batches()
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    gap = recompute_bn_stats(net, data, 3, run, update=False)
    assert gap.disagrees and gap.num_batches == 3
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(m.training for m in net.modules())
    assert recompute_bn_stats(nn.Sequential(nn.Linear(2, 2)), data, 3, run) is None  # no BatchNorm: no forward
    assert recompute_bn_stats(net, [], 3, run) is None


def _ddp_recompute(rank, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        net, data = tiny_net(), batches(4)
        recompute_bn_stats(net, data[rank::2], 2, run)  # each rank its own shard
        if rank == 1:
            torch.save({k: v for k, v in net.state_dict().items() if "running" in k}, out_file)
    finally:
        dist.destroy_process_group()


def test_ranks_merge_their_statistics_into_those_of_all_their_batches(tmp_path, one_thread_per_process):
    mp.spawn(_ddp_recompute, args=(str(tmp_path / "init"), str(tmp_path / "rank1.pt")), nprocs=2, join=True)
    merged = torch.load(tmp_path / "rank1.pt", weights_only=True)
    net, data = tiny_net(), batches(4)
    recompute_bn_stats(net, data, 4, run)
    for k, v in merged.items():
        assert torch.allclose(v, net.state_dict()[k], rtol=1e-5, atol=1e-7), k


@pytest.mark.parametrize("precise", [True, False])
def test_eval_accuracy_early_in_training_matches_train_mode_only_with_precise_bn(tmp_path, caplog, precise):
    """16 steps on a learnable synthetic task: the running variances still carry most of their initial 1,
    so eval mode predicts near chance unless the statistics are recomputed (issue 6)."""
    write_fashion_mnist(tmp_path / "data", n_train=512, n_test=200)
    overrides = TINY_OVERRIDES + [
        "MODEL.IMAGE_SIZE", "[16, 16]", "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[8, 16]",
        "MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS", "[4, 8]", "DEQ.GRAD", "phantom", "DEQ.PHANTOM_STEPS", "3",
        "DEQ.PHANTOM_TAU", "0.8", "TRAIN.LR", "0.005", "TRAIN.END_EPOCH", "1", "TRAIN.BATCH_SIZE_PER_GPU", "32",
        "TEST.BATCH_SIZE_PER_GPU", "200", "TRAIN.PRECISE_BN", str(precise), "DATASET.ROOT", str(tmp_path / "data"),
        "OUTPUT_DIR", str(tmp_path / "out"), "LOG_DIR", str(tmp_path / "log")]
    path = REPO / "experiments/fashion_mnist/cls_mdeq_quickstart.yaml"
    trainer = Trainer(load_config(path, overrides), path)
    with caplog.at_level(logging.INFO, logger="deqlab"):
        top1 = trainer.fit()["top1"]
    with torch.no_grad():  # the same weights in train mode (batch statistics) on the same 200 test images
        trainer.model.train()
        x, y = next(iter(trainer.test_loader))
        train_mode = 100 * (trainer.model(x, train_step=-1)[0].argmax(1) == y).float().mean().item()
    assert trainer.step == 16 and train_mode > 40
    [record] = [r for r in caplog.records if "BatchNorm statistics" in r.getMessage()]
    # The cause, measured: the running variances after 16 steps are still more than 10x the true ones.
    assert float(re.search(r"running variance off by x(\S+) ", record.getMessage()).group(1)) > 10
    if precise:
        assert abs(top1 - train_mode) <= 3 and record.levelno == logging.INFO
    else:
        assert top1 < 20 and record.levelno == logging.WARNING and "TRAIN.PRECISE_BN True" in record.getMessage()
