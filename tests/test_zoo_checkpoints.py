"""Checkpoints of the torchdeq zoo's MDEQ (../shared/compat/zoo) load through the named ``zoo`` weights format into
the zoo configs, and give the zoo model's outputs."""
import json

import pytest
import torch

from deqlab.checkpoint import load_checkpoint, load_weights
from deqlab.config import load_config
from deqlab.engine import Trainer
from deqlab.errors import CheckpointError
from deqlab.layers import reset_per_forward
from deqlab.models import build_model
from deqlab.tasks import get_task

from conftest import COMPAT, REPO, needs_compat
from test_data import write_cifar

pytestmark = needs_compat
ZOO = COMPAT / "zoo"
CONFIGS = {"cifar_small": REPO / "experiments/cifar/cls_mdeq_zoo_small.yaml",
           "cifar_large": REPO / "experiments/cifar/cls_mdeq_zoo_large.yaml",
           "imagenet_small": REPO / "experiments/imagenet/cls_mdeq_zoo_small.yaml"}
TIGHT = ["DEQ.F_SOLVER", "broyden", "DEQ.F_THRES", "120", "DEQ.F_EPS", "1e-11", "DEQ.STOP_MODE", "abs"]


def ours(zoo_key: str) -> str:
    """The deqlab name of a zoo state_dict key."""
    key = zoo_key.removeprefix("module.")
    return "fullstage." + key[len("full_stage."):] if key.startswith("full_stage.") else key


def random_zoo_checkpoint(manifest: str, path, seed: int = 0) -> dict:
    """A file with the manifest's keys and shapes and random values, in the layout its zoo script saves: ImageNet
    ``{'epoch', 'state_dict', 'best_acc1', 'optimizer'}`` (SGD state), CIFAR main.py's ``checkpoint.pth.tar``."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for entry in json.loads((ZOO / f"zoo_{manifest}.manifest.json").read_text()):
        dtype = getattr(torch, entry["dtype"])
        state[entry["key"]] = (torch.randint(0, 100, entry["shape"], generator=gen).to(dtype)
                               if not dtype.is_floating_point else torch.rand(entry["shape"], generator=gen) + 0.5)
    params = [i for i, k in enumerate(state) if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    optimizer = {"state": {i: {"momentum_buffer": torch.zeros(1)} for i in params[:3]},
                 "param_groups": [{"lr": 0.05, "momentum": 0.9, "dampening": 0, "weight_decay": 5e-5,
                                   "nesterov": True, "params": params}]}
    if manifest.startswith("imagenet"):
        blob = {"epoch": 3, "state_dict": state, "best_acc1": 12.5, "optimizer": optimizer}
    else:
        blob = {"epoch": 3, "model": "mdeq", "state_dict": state, "perf": torch.tensor(50.0), "optimizer": optimizer}
    torch.save(blob, path)
    return state


def test_zoo_cifar_small_checkpoint_gives_the_zoo_logits():
    """TEST.MODEL_FILE's path (the task's load_weights, strict, MODEL.WEIGHTS_FORMAT auto) on the file the zoo
    wrote, then a tight float64 solve: the zoo model's logits."""
    cfg = load_config(CONFIGS["cifar_small"], TIGHT + ["TEST.MODEL_FILE", str(ZOO / "zoo_cifar_small.pth.tar")])
    ref = torch.load(ZOO / "zoo_cifar_small_reference.pt", weights_only=True)
    model = build_model(cfg).eval()
    get_task("cls", cfg).load_weights(model, cfg.TEST.MODEL_FILE)
    model = model.double()
    with torch.no_grad():
        logits, info = model(ref["input"])
    expected = ref["logits_float64_tight"]
    assert info["fwd"]["abs_lowest"].max() < 1e-10
    assert (logits - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_the_format_is_named_and_checked_against_the_keys(tmp_path):
    model = build_model(load_config(CONFIGS["cifar_small"]))
    zoo_file = ZOO / "zoo_cifar_small.pth.tar"
    with pytest.raises(CheckpointError, match=r"not in the 'deqlab' format .*torchdeq zoo's \(full_stage"):
        load_weights(model, zoo_file, fmt="deqlab")
    load_weights(model, zoo_file, fmt="zoo")  # named explicitly: the same conversion as auto
    ours_file = tmp_path / "ours.pth"
    torch.save({"model": model.state_dict()}, ours_file)
    with pytest.raises(CheckpointError, match="not in the 'zoo' format"):
        load_weights(model, ours_file, fmt="zoo")


@pytest.mark.parametrize("manifest", ["imagenet_small", "cifar_large"])
def test_a_checkpoint_with_the_manifest_layout_loads_into_the_zoo_config(manifest, tmp_path):
    path = tmp_path / f"{manifest}.pth"
    state = random_zoo_checkpoint(manifest, path)
    model = build_model(load_config(CONFIGS[manifest]))
    load_weights(model, path)  # strict
    own = model.state_dict()
    assert len(own) == len(state)
    for key, tensor in state.items():
        assert torch.equal(own[ours(key)], tensor), key


@pytest.mark.parametrize("layers", [["blocks"], ["blocks", "post_fuse"]])
def test_weight_norm_is_folded_into_a_model_that_normalises_fewer_convs(layers):
    """The CIFAR file (every cell conv weight-normalised) into a model with plain fusion convs: w = v g / ||v||,
    the same cell function up to float32 rounding of the folded weights."""
    exact, folded = (build_model(load_config(CONFIGS["cifar_small"], ["MODEL.NORM_LAYERS", str(v)])).eval()
                     for v in (["blocks", "fuse", "post_fuse"], layers))
    for model in (exact, folded):
        load_weights(model, ZOO / "zoo_cifar_small.pth.tar")
    assert "fullstage.fuse_layers.0.1.net.conv.weight" in folded.state_dict()
    assert_same_cell(exact.double(), folded.double())


def test_weight_norm_is_split_out_for_a_model_that_normalises_more_convs(tmp_path):
    """An ImageNet-style file (plain fusion convs) into a model that weight-normalises them: g = ||w||, v = w."""
    plain = build_model(load_config(CONFIGS["cifar_small"], ["MODEL.NORM_LAYERS", "['blocks']"])).eval()
    zoo_state = {k.replace("fullstage.", "full_stage."): v for k, v in plain.state_dict().items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in zoo_state.items()}}, tmp_path / "zoo.pth")
    normed = build_model(load_config(CONFIGS["cifar_small"])).eval()
    load_weights(normed, tmp_path / "zoo.pth")
    assert_same_cell(plain.double(), normed.double())


def assert_same_cell(a, b):
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        injection, z0 = a.cell_inputs(x)
        z = [torch.randn_like(t) for t in z0]
        for model in (a, b):
            reset_per_forward(model)  # the normalised weights of the loaded, float64 parameters
        fa, fb = a.fullstage(z, injection), b.fullstage(z, injection)
    for u, v in zip(fa, fb):
        assert (u - v).abs().max() <= 1e-5 * u.abs().max()
        assert not torch.equal(u, torch.zeros_like(u))


def test_zoo_configs_carry_the_zoo_recipe():
    small, large, imagenet = (load_config(CONFIGS[k]) for k in ("cifar_small", "cifar_large", "imagenet_small"))
    for cfg, f_thres, tau in ((small, 22, 0.5), (large, 18, 0.7)):  # run_small.sh, run.sh
        assert (cfg.DEQ.F_SOLVER, cfg.DEQ.F_THRES, cfg.DEQ.PHANTOM_TAU) == ("broyden", f_thres, tau)
        assert list(cfg.DATASET.STD) == [0.2023, 0.1994, 0.2010]
        assert list(cfg.MODEL.NORM_LAYERS) == ["blocks", "fuse", "post_fuse"]
        assert (cfg.TRAIN.OPTIMIZER, cfg.TRAIN.LR, cfg.TRAIN.WD, cfg.TRAIN.NESTEROV) == ("sgd", 0.1, 1e-4, False)
    assert (imagenet.DEQ.F_SOLVER, imagenet.DEQ.F_THRES, imagenet.DEQ.PHANTOM_TAU) == ("fixed_point", 26, 1.0)
    assert list(imagenet.MODEL.NORM_LAYERS) == ["blocks"]
    assert (imagenet.TRAIN.LR, imagenet.TRAIN.NESTEROV, imagenet.TRAIN.MOMENTUM, imagenet.TRAIN.WD,
            imagenet.TRAIN.WARMUP_STEPS, imagenet.TRAIN.END_EPOCH, imagenet.TRAIN.BATCH_SIZE_PER_GPU) == (
        0.05, True, 0.9, 5e-5, 0, 100, 64)
    for cfg in (small, large, imagenet):  # torchdeq: --grad 5, f_tol 1e-3 abs, weight norm, sup_gap -1
        assert (cfg.DEQ.GRAD, cfg.DEQ.PHANTOM_STEPS, cfg.DEQ.F_EPS, cfg.DEQ.STOP_MODE) == ("phantom", 5, 1e-3, "abs")
        assert (cfg.MODEL.NORM_TYPE, cfg.LOSS.FPC, cfg.TRAIN.PRETRAIN_STEPS, cfg.TRAIN.LR_MIN) == (
            "weight_norm", False, 0, 1e-6)


def test_training_starts_from_a_zoo_checkpoint_with_the_zoo_recipe(tmp_path):
    """TRAIN.MODEL_FILE = the zoo's file: the trainer starts from its weights and trains with the zoo config."""
    write_cifar(tmp_path / "cifar10", n_train=2, n_test=4)
    cfg = load_config(CONFIGS["cifar_small"], [
        "TRAIN.MODEL_FILE", str(ZOO / "zoo_cifar_small.pth.tar"), "DATASET.ROOT", str(tmp_path / "cifar10"),
        "OUTPUT_DIR", str(tmp_path / "out"), "LOG_DIR", str(tmp_path / "log"), "DEVICE", "cpu", "WORKERS", "0",
        "TRAIN.BATCH_SIZE_PER_GPU", "4", "TEST.BATCH_SIZE_PER_GPU", "4", "TRAIN.MAX_STEP", "2", "PRINT_FREQ", "1"])
    trainer = Trainer(cfg, CONFIGS["cifar_small"])
    zoo = torch.load(ZOO / "zoo_cifar_small.pth.tar", weights_only=True)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert all(torch.equal(start[ours(k)], v) for k, v in zoo.items())
    metrics = trainer.fit()
    assert metrics["count"] == 4 and torch.isfinite(torch.tensor(metrics["loss"]))
    final = load_checkpoint(trainer.files.final)["model"]
    assert all(torch.isfinite(v).all() for v in final.values())
    assert any(not torch.equal(final[k], start[k]) for k in start if k.endswith("weight_v"))
