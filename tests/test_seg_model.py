"""MDEQ segmenter: the original's names, shapes and outputs (../shared/compat), registry, pretrained transfer."""
import json
import re

import pytest
import torch
import torch.nn.functional as F

from deqlab.checkpoint import load_weights
from deqlab.config import get_defaults, load_config
from deqlab.errors import CheckpointError, ConfigError
from deqlab.models import build_model
from deqlab.models.mdeq_cls import MDEQClassifier
from deqlab.models.mdeq_seg import MDEQSegNet

from conftest import COMPAT, LAYOUTS, REPO, needs_compat
from test_mdeq_compat import SETTING_KEYS, manifest_keys, model_keys

MINI4 = COMPAT / "configs/v1_seg_mdeq_MINI4.yaml"
# Without fixtures, one missing path keeps the list non-empty, so that CI=true fails instead of skipping.
SEG_MANIFESTS = (sorted(COMPAT.glob("manifests/**/cityscapes_seg_*.json"))
                 or [COMPAT / "manifests/cityscapes_seg_mdeq_MINI4.json"])
SEG_SETTING_KEYS = {  # the seg head reads its class count from DATASET and has no cls head widths
    **{k: v for k, v in SETTING_KEYS.items() if k not in ("NUM_CLASSES", "HEAD_CHANNELS", "FINAL_CHANSIZE")},
    "NUM_CLASSES": "DATASET.NUM_CLASSES", "FINAL_CONV_KERNEL": "MODEL.EXTRA.FINAL_CONV_KERNEL",
}
# The shipped SMALL configs shrunk to a seconds-sized model (the backbone of the MINI4 fixtures).
SMALL_BACKBONE = ["MODEL.NUM_GROUPS", "4", "MODEL.DROPOUT", "0.0", "MODEL.IMAGE_SIZE", "[64, 64]",
                  "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[8, 16, 32, 64]"]
TINY_SEG = SMALL_BACKBONE + ["TRAIN.IMAGE_SIZE", "[128, 64]", "TEST.IMAGE_SIZE", "[128, 64]"]
TINY_CLS = SMALL_BACKBONE + ["MODEL.NUM_CLASSES", "10", "MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS", "[4, 8, 16, 32]",
                             "MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE", "64"]
SEG_SMALL = REPO / "experiments/cityscapes/seg_mdeq_SMALL.yaml"
CLS_SMALL = REPO / "experiments/imagenet/cls_mdeq_SMALL.yaml"
HEAD = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")


def mini4(overrides=(), weights="seg_mini4_conditioned.pkl"):
    """The MINI4 segmenter with the original's conditioned weights and its reference outputs."""
    model = build_model(load_config(MINI4, list(overrides)), task="seg").eval()
    load_weights(model, COMPAT / weights)
    return model, torch.load(COMPAT / "seg_mini4_conditioned_reference_outputs.pt", weights_only=True)


def max_diff(got, want) -> float:
    if isinstance(got, torch.Tensor):
        return (got.double() - want.double()).abs().max().item()
    return max(max_diff(g, w) for g, w in zip(got, want, strict=True))


# --- outputs of the original code (MINI4: four branches, stage0, 19 classes) ----------------------------------

@needs_compat
@pytest.mark.parametrize("layout", LAYOUTS)
def test_solver_free_outputs_match_the_original(layout):
    model, ref = mini4(LAYOUTS[layout])
    x = ref["input"]
    with torch.no_grad():
        injection, z = model.cell_inputs(x)
        f_of_zero = model.fullstage(z, injection)
        for _ in range(model.deq.pretrain_depth):
            z = model.fullstage(z, injection)
        logits_unrolled, info = model(x, train_step=0)
    assert info["fwd"] is None  # unrolled: no solver ran
    assert logits_unrolled.shape == (2, 19, 16, 32)  # 1/4 of the 64x128 input
    # Measured: 0, 9.2e-7, 3.1e-7; the original's float32 and float64 values differ by up to 1.2e-6.
    assert max_diff(f_of_zero, ref["f_of_zero"]) < 1e-5
    assert max_diff(z, ref["z_unrolled"]) < 1e-5
    assert max_diff(logits_unrolled, ref["logits_unrolled"]) < 1e-5
    # The head's bilinear upsampling uses align_corners=True like the original; False is 0.18 away.
    size = z[0].shape[-2:]
    feats = [z[0]] + [F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in z[1:]]
    with torch.no_grad():
        assert max_diff(model.last_layer(torch.cat(feats, dim=1)), ref["logits_unrolled"]) > 1e-2


@needs_compat
@pytest.mark.parametrize("layout", LAYOUTS)
def test_equilibrium_logits_match_the_original_float64_solve_in_float32(layout):
    model, ref = mini4(["DEQ.F_SOLVER", "broyden", "DEQ.F_THRES", "120", "DEQ.F_EPS", "2e-6", "DEQ.STOP_MODE", "rel",
                        *LAYOUTS[layout]])
    with torch.no_grad():
        logits, info = model(ref["input"])
    assert info["fwd"]["rel_lowest"].max() < 2e-5
    assert max_diff(logits, ref["logits_float64"]) < 1e-4  # measured 1.5e-6
    # The unrolled and equilibrium paths differ by far more than the tolerance, so this is a real check.
    assert max_diff(ref["logits_unrolled"], ref["logits_float64"]) > 1e-3


@needs_compat
def test_float64_solve_reproduces_the_original_float64_equilibrium():
    model, ref = mini4(["DEQ.F_THRES", "200", "DEQ.F_EPS", "1e-8", "DEQ.STOP_MODE", "rel"])
    model.double()
    with torch.no_grad():
        logits, info = model(ref["input"].double())
    assert info["fwd"]["rel_lowest"].max() < 1e-8
    assert max_diff(logits, ref["logits_float64"]) < 1e-4  # the brief's contract (that entry is float32-rounded)
    assert max_diff(logits, ref["logits_float64_exact"]) < 1e-7  # measured 3.9e-9


@needs_compat
def test_seg_train_checkpoint_loads_like_the_plain_state_dict():
    raw = torch.load(COMPAT / "seg_mini4_conditioned_trainckpt.pkl", weights_only=True)
    assert "loss.criterion.weight" in raw and all(k.startswith(("model.", "loss.")) for k in raw)
    plain, ref = mini4()
    wrapped, _ = mini4(weights="seg_mini4_conditioned_trainckpt.pkl")
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, wrapped.state_dict()[name]), name
    with torch.no_grad():
        logits, _ = wrapped(ref["input"], train_step=0)
    assert max_diff(logits, ref["logits_unrolled"]) < 1e-5


@needs_compat
def test_a_checkpoint_for_another_class_count_names_the_last_layer():
    model = build_model(load_config(MINI4, ["DATASET.NUM_CLASSES", "7"]), task="seg")
    with pytest.raises(CheckpointError) as err:
        load_weights(model, COMPAT / "seg_mini4_conditioned.pkl")
    wrong = re.search(r"wrong shape: (.*)", str(err.value)).group(1)
    assert re.findall(r"([\w.]+) \([\d, ]*\) vs model", wrong) == ["last_layer.3.weight", "last_layer.3.bias"]
    assert "(19, 120, 1, 1) vs model (7, 120, 1, 1)" in wrong


# --- names and shapes of every original configuration --------------------------------------------------------

@needs_compat
@pytest.mark.parametrize("path", SEG_MANIFESTS, ids=lambda p: str(p.relative_to(COMPAT / "manifests")))
def test_model_from_manifest_settings_has_exactly_its_keys_and_shapes(path):
    cfg = get_defaults()
    for name, value in json.loads(path.read_text())["model_settings"].items():
        if name in SEG_SETTING_KEYS and value is not None:
            cfg.merge_from_list([SEG_SETTING_KEYS[name], value])
    with torch.device("meta"):  # XL has ~80M parameters: shapes only, no memory
        model = build_model(cfg, task="seg")
    assert model_keys(model) == manifest_keys(path)


@needs_compat
@pytest.mark.parametrize("path", SEG_MANIFESTS, ids=lambda p: str(p.relative_to(COMPAT / "manifests")))
def test_shipped_config_builds_the_original_model(path):
    """SMALL/LARGE/XL: our experiments/cityscapes yamls (v1 and deq_v2 build the same seg model); MINI4: the
    original-layout yaml of the fixtures, loaded unchanged."""
    config = json.loads(path.read_text())["config"]
    cfg = load_config((COMPAT if config.startswith("configs/") else REPO) / config)
    with torch.device("meta"):
        model = build_model(cfg, task="seg")
    assert model_keys(model) == manifest_keys(path)


# --- registry, head, transfer from a classifier (no fixtures needed) -----------------------------------------

def test_registry_picks_the_model_by_task():
    seg = build_model(load_config(SEG_SMALL, TINY_SEG), task="seg")
    cls = build_model(load_config(CLS_SMALL, TINY_CLS))  # "cls" stays the default task
    assert type(seg) is MDEQSegNet and type(cls) is MDEQClassifier
    # The original builds the segmenter with BatchNorm momentum 0.01, the classifier with 0.1.
    assert {m.momentum for m in seg.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.01}
    assert {m.momentum for m in cls.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}
    with pytest.raises(ConfigError, match=r"MODEL.NAME: unknown seg model 'hrnet'; known: mdeq"):
        build_model(load_config(SEG_SMALL, TINY_SEG + ["MODEL.NAME", "hrnet"]), task="seg")
    with pytest.raises(ValueError, match="unknown model task 'det'; known: cls, lm, seg"):
        build_model(load_config(SEG_SMALL, TINY_SEG), task="det")


@pytest.mark.parametrize("kernel", [1, 3])
def test_logits_at_a_quarter_of_the_input(kernel):
    cfg = load_config(SEG_SMALL, TINY_SEG + ["DATASET.NUM_CLASSES", "5", "MODEL.EXTRA.FINAL_CONV_KERNEL", str(kernel),
                                             "DEQ.F_THRES", "4"])
    model = build_model(cfg, task="seg").eval()
    assert model.last_layer[3].weight.shape == (5, 120, kernel, kernel)
    with torch.no_grad():
        logits, info = model(torch.randn(1, 3, 64, 96))
    assert logits.shape == (1, 5, 16, 24) and info["fwd"]["nstep"] == 4 and info["fwd"]["nfe"] == 5  # Broyden


@pytest.mark.parametrize("key", ["TRAIN.IMAGE_SIZE", "TEST.IMAGE_SIZE"])
def test_crop_sizes_that_cannot_fuse_are_config_errors(key):
    # 100 / 4 = 25 is not divisible by 2^3: branch 3 could not be upsampled back onto branch 0.
    with pytest.raises(ConfigError, match=re.escape(f"{key} [100, 64]")):
        build_model(load_config(SEG_SMALL, TINY_SEG + [key, "[100, 64]"]), task="seg")


def test_training_step_reaches_every_parameter():
    cfg = load_config(SEG_SMALL, TINY_SEG + ["DEQ.F_THRES", "6", "DEQ.B_THRES", "6", "TRAIN.PRETRAIN_STEPS", "0"])
    torch.manual_seed(0)
    model = build_model(cfg, task="seg").train()
    logits, info = model(torch.randn(2, 3, 64, 64), train_step=5, compute_jac_loss=True)
    labels = torch.randint(0, 19, (2, 64, 64))
    loss = F.cross_entropy(F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=True), labels)
    (loss + info["jac_loss"].mean()).backward()
    assert info["fwd"] is not None and info["bwd"]["nstep"] > 0  # the implicit backward ran
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_pretrained_classifier_transfers_its_backbone_only(tmp_path):
    torch.manual_seed(0)
    cls = build_model(load_config(CLS_SMALL, TINY_CLS))
    cls_state = cls.state_dict()
    torch.save(cls_state, tmp_path / "imagenet_cls.pth")
    torch.manual_seed(1)
    seg = build_model(load_config(SEG_SMALL, TINY_SEG), task="seg")
    head_init = {k: v.clone() for k, v in seg.state_dict().items() if k.startswith("last_layer.")}
    report = load_weights(seg, tmp_path / "imagenet_cls.pth", strict=False, exclude=("classifier.",))
    seg_state = seg.state_dict()
    backbone = [k for k in seg_state if not k.startswith("last_layer.")]
    assert backbone and all(torch.equal(seg_state[k], cls_state[k]) for k in backbone)
    assert all(torch.equal(seg_state[k], v) for k, v in head_init.items())  # last_layer keeps its init
    assert sorted(report["missing"]) == sorted(head_init)
    assert report["mismatched"] == []
    assert sorted(report["unexpected"] + report["dropped"]) == sorted(k for k in cls_state if k.startswith(HEAD))
    assert sorted(report["dropped"]) == ["classifier.bias", "classifier.weight"]


@needs_compat
def test_original_classifier_file_transfers_into_the_segmenter():
    """The original's ImageNet files carry fullstage_copy/deq aliases; only the backbone may arrive."""
    original = torch.load(COMPAT / "cls_mini4_conditioned.pkl", weights_only=True)
    seg = build_model(load_config(MINI4), task="seg")
    report = load_weights(seg, COMPAT / "cls_mini4_conditioned.pkl", strict=False, exclude=("classifier.",))
    state = seg.state_dict()
    assert all(torch.equal(state[k], original[k]) for k in state if not k.startswith("last_layer."))
    assert {k.split(".")[0] for k in report["unexpected"]} == {"incre_modules", "downsamp_modules", "final_layer"}
    assert {k.split(".")[0] for k in report["dropped"]} == {"fullstage_copy", "deq", "classifier"}
