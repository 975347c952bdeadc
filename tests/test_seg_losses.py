"""Segmentation losses (cross-entropy, OHEM) against direct computations, and mIoU / pixel accuracy against
a confusion matrix worked out by hand."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deqlab.config import get_defaults
from deqlab.segmentation.losses import CITYSCAPES_CLASS_WEIGHTS, CrossEntropy, OhemCrossEntropy, build_seg_criterion
from deqlab.segmentation.metrics import confusion_matrix, segmentation_scores

IGNORE = 255


def batch(seed=0, classes=4, low=(3, 4), high=(6, 8), ignored=0.2):
    """Low-resolution logits (2, C, *low) and labels (2, *high) with a fraction of ignore pixels."""
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(2, classes, *low, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, classes, (2, *high), generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < ignored] = IGNORE
    return logits.requires_grad_(), labels


def ohem_direct(logits, labels, thres, min_kept, weight=None):
    """The original's OHEM rule written out pixel by pixel in numpy (on the upsampled logits), and the number
    of pixels it keeps."""
    up = F.interpolate(logits.detach(), size=labels.shape[-2:], mode="bilinear", align_corners=True).numpy()
    probs, losses = [], []
    for b, i, j in np.ndindex(*labels.shape):
        y = int(labels[b, i, j])
        if y == IGNORE:
            continue
        z = up[b, :, i, j]
        log_p = z[y] - (z.max() + math.log(np.exp(z - z.max()).sum()))
        probs.append(math.exp(log_p))
        losses.append(-log_p * (1.0 if weight is None else weight[y]))
    probs, losses = np.array(probs), np.array(losses)
    threshold = max(np.sort(probs)[min(max(min_kept, 1), len(probs) - 1)], thres)
    kept = losses[probs < threshold]
    return kept.mean(), len(kept)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("thres,min_kept", [(0.7, 5), (0.0, 5), (0.3, 40), (0.0, 10_000), (0.99, 10_000)])
def test_ohem_matches_the_direct_computation(weighted, thres, min_kept):
    logits, labels = batch(classes=4)
    weight = [0.5, 1.0, 1.5, 2.0] if weighted else None
    expected, n_kept = ohem_direct(logits, labels, thres, min_kept, weight)
    n_valid = int((labels != IGNORE).sum())
    if thres == 0.0:  # the k-th smallest probability alone decides: min_kept pixels (all but the easiest one)
        assert n_kept == min(min_kept, n_valid - 1)
    loss = OhemCrossEntropy(IGNORE, thres, min_kept, weight)(logits.float(), labels)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_ohem_gradients_reach_only_the_kept_pixels():
    logits, labels = batch(classes=3, low=(6, 8), high=(6, 8))  # same resolution: pixel i is logit i
    loss = OhemCrossEntropy(IGNORE, thres=0.0, min_kept=7)(logits, labels)
    loss.backward()
    touched = logits.grad.abs().sum(1) > 0
    assert int(touched.sum()) == 7
    assert not touched[labels == IGNORE].any()


@pytest.mark.parametrize("criterion", [CrossEntropy(IGNORE), OhemCrossEntropy(IGNORE, 0.7, 10)])
def test_an_all_ignored_batch_gives_a_zero_loss_with_a_graph(criterion):
    logits, labels = batch()
    labels.fill_(IGNORE)
    loss = criterion(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("weight", [None, [0.5, 1.0, 1.5, 2.0]])
def test_cross_entropy_is_torchs_on_logits_upsampled_with_aligned_corners(weight):
    logits, labels = batch()
    w = None if weight is None else torch.tensor(weight, dtype=torch.float64)
    loss = CrossEntropy(IGNORE, weight)(logits.float(), labels)
    for align_corners, same in ((True, True), (False, False)):
        up = F.interpolate(logits.detach(), size=labels.shape[-2:], mode="bilinear", align_corners=align_corners)
        expected = F.cross_entropy(up, labels, weight=w, ignore_index=IGNORE).item()
        assert (loss.item() == pytest.approx(expected, rel=1e-5)) is same


def test_class_weights_follow_the_module_but_stay_out_of_checkpoints():
    holder = nn.Module()
    holder.head = nn.Conv2d(3, 19, 1)
    holder.criterion = CrossEntropy(IGNORE, CITYSCAPES_CLASS_WEIGHTS)
    assert all(not key.startswith("criterion") for key in holder.state_dict())
    assert holder.to(torch.float64).criterion.weight.dtype == torch.float64


def test_build_seg_criterion_reads_the_config():
    cfg = get_defaults()  # NUM_CLASSES 19, LABEL_MAPPING cityscapes, no OHEM
    cfg.defrost()
    crit = build_seg_criterion(cfg)
    assert type(crit) is CrossEntropy and crit.ignore_label == 255
    assert crit.weight.tolist() == pytest.approx(CITYSCAPES_CLASS_WEIGHTS) and len(CITYSCAPES_CLASS_WEIGHTS) == 19
    cfg.LOSS.USE_OHEM, cfg.LOSS.OHEMTHRES, cfg.LOSS.OHEMKEEP, cfg.TRAIN.IGNORE_LABEL = True, 0.8, 123, 7
    crit = build_seg_criterion(cfg)
    assert isinstance(crit, OhemCrossEntropy) and (crit.thres, crit.min_kept, crit.ignore_label) == (0.8, 123, 7)
    cfg.DATASET.LABEL_MAPPING = "none"  # e.g. fashion_scenes: unweighted
    assert build_seg_criterion(cfg).weight is None
    cfg.DATASET.LABEL_MAPPING, cfg.DATASET.NUM_CLASSES = "cityscapes", 11
    assert build_seg_criterion(cfg).weight is None


# Ground truth and prediction of 6 pixels, one ignored (255), classes 0..2:
#   label = [[0, 0, 1],      pred = [[0, 1, 1],
#            [1, 2, 255]]            [2, 2, 0]]
# Labelled pixels (gt -> pred): 0->0, 0->1, 1->1, 1->2, 2->2.
# Confusion (rows gt, cols pred): [[1, 1, 0], [0, 1, 1], [0, 0, 1]]; gt sums 2, 2, 1; pred sums 1, 2, 2; tp 1, 1, 1.
# IoU = tp / (gt + pred - tp): class 0: 1/(2+1-1) = 1/2, class 1: 1/(2+2-1) = 1/3, class 2: 1/(1+2-1) = 1/2.
# mIoU = (1/2 + 1/3 + 1/2) / 3 = 4/9; pixel accuracy = 3/5; mean class accuracy = (1/2 + 1/2 + 1/1) / 3 = 2/3.
LABEL = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
PRED = torch.tensor([[[0, 1, 1], [2, 2, 0]]])
CONF = [[1, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_confusion_matrix_and_scores_match_the_hand_computation():
    conf = confusion_matrix(PRED, LABEL, 3, IGNORE)
    assert conf.dtype == torch.int64 and conf.tolist() == CONF
    scores = segmentation_scores(conf)
    assert scores["iou"] == pytest.approx([1 / 2, 1 / 3, 1 / 2])
    assert scores["miou"] == pytest.approx(4 / 9)
    assert scores["pixel_acc"] == pytest.approx(3 / 5)
    assert scores["mean_acc"] == pytest.approx(2 / 3)


def test_logits_give_the_matrix_of_their_argmax_and_matrices_add_up():
    logits = F.one_hot(PRED, 3).permute(0, 3, 1, 2).float() * 5 + 0.1 * torch.randn(1, 3, 2, 3)
    assert confusion_matrix(logits, LABEL, 3, IGNORE).tolist() == CONF
    two = confusion_matrix(torch.cat([PRED, PRED.flip(-1)]), torch.cat([LABEL, LABEL.flip(-1)]), 3, IGNORE)
    assert torch.equal(two, 2 * torch.tensor(CONF))


def test_a_class_absent_from_gt_and_prediction_does_not_count():
    # A 4th class that never occurs: its IoU is undefined (nan) and the mean stays over the 3 present ones
    # (the original averaged over all 4 with 0 for it: 4/9 * 3/4 = 1/3).
    scores = segmentation_scores(confusion_matrix(PRED, LABEL, 4, IGNORE))
    assert math.isnan(scores["iou"][3]) and scores["miou"] == pytest.approx(4 / 9)
    assert scores["mean_acc"] == pytest.approx(2 / 3)
    empty = segmentation_scores(torch.zeros(4, 4, dtype=torch.int64))
    assert (empty["miou"], empty["pixel_acc"], empty["mean_acc"]) == (0.0, 0.0, 0.0)
    assert all(math.isnan(v) for v in empty["iou"])


def test_labels_outside_the_classes_are_refused():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        confusion_matrix(PRED, LABEL, 2, IGNORE)
