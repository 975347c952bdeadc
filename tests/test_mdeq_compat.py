"""MDEQ against fixtures produced by the original code (../shared/compat): names, shapes and outputs."""
import json
from pathlib import Path

import pytest
import torch

from deqlab.checkpoint import load_weights
from deqlab.config import get_defaults, load_config
from deqlab.models import build_model

from conftest import COMPAT, LAYOUTS, REPO, needs_compat

pytestmark = needs_compat
ALIASES = ("fullstage_copy.", "deq.func.", "deq.func_copy.")
SETTING_KEYS = {  # manifest model_settings → config key
    "NUM_LAYERS": "MODEL.NUM_LAYERS", "NUM_CLASSES": "MODEL.NUM_CLASSES", "NUM_GROUPS": "MODEL.NUM_GROUPS",
    "DROPOUT": "MODEL.DROPOUT", "WNORM": "MODEL.WNORM", "DOWNSAMPLE_TIMES": "MODEL.DOWNSAMPLE_TIMES",
    "EXPANSION_FACTOR": "MODEL.EXPANSION_FACTOR", "POST_GN_AFFINE": "MODEL.POST_GN_AFFINE",
    "BLOCK_GN_AFFINE": "MODEL.BLOCK_GN_AFFINE", "FUSE_GN_AFFINE": "MODEL.FUSE_GN_AFFINE",
    **{k: f"MODEL.EXTRA.FULL_STAGE.{k}" for k in ("NUM_BRANCHES", "NUM_CHANNELS", "NUM_BLOCKS", "HEAD_CHANNELS",
                                                  "FINAL_CHANSIZE", "BIG_KERNELS")},
}
CLS_MANIFESTS = sorted(p for p in COMPAT.glob("manifests/**/*.json") if "_cls_" in p.name)


def manifest_keys(path: Path) -> dict[str, tuple[int, ...]]:
    keys = json.loads(path.read_text())["keys"]
    return {name: tuple(shape) for name, shape in keys if not name.startswith(ALIASES)}


def model_keys(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


@pytest.mark.parametrize("path", CLS_MANIFESTS, ids=lambda p: str(p.relative_to(COMPAT / "manifests")))
def test_model_from_manifest_settings_has_exactly_its_keys_and_shapes(path):
    cfg = get_defaults()
    for name, value in json.loads(path.read_text())["model_settings"].items():
        if name in SETTING_KEYS and value is not None:
            cfg.merge_from_list([SETTING_KEYS[name], value])
    with torch.device("meta"):  # XL has ~80M parameters: shapes only, no memory
        model = build_model(cfg)
    assert model_keys(model) == manifest_keys(path)


@pytest.mark.parametrize("name", ["cifar_cls_mdeq_TINY", "cifar_cls_mdeq_LARGE", "imagenet_cls_mdeq_SMALL",
                                  "imagenet_cls_mdeq_LARGE", "imagenet_cls_mdeq_XL"])
def test_shipped_experiment_yaml_builds_the_original_model(name):
    manifest = COMPAT / "manifests" / f"{name}.json"
    cfg = load_config(REPO / json.loads(manifest.read_text())["config"])
    with torch.device("meta"):
        model = build_model(cfg)
    assert model_keys(model) == manifest_keys(manifest)


def load_reference(cfg_path: Path, overrides: list, weights: str, reference: str):
    cfg = load_config(cfg_path, overrides)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    load_weights(model, COMPAT / weights)
    return model, torch.load(COMPAT / reference, weights_only=True)


CASES = {
    "cifar_tiny": (REPO / "experiments/cifar/cls_mdeq_TINY.yaml", "cifar_tiny_conditioned.pkl",
                   "cifar_tiny_conditioned_reference_outputs.pt"),
    "mini4_v1_yaml": (COMPAT / "configs/v1_cls_mdeq_MINI4.yaml", "cls_mini4_conditioned.pkl",
                      "cls_mini4_conditioned_reference_outputs.pt"),
}
SOLVE = ["DEQ.F_SOLVER", "broyden", "DEQ.F_THRES", 120, "DEQ.F_EPS", 2e-6, "DEQ.STOP_MODE", "rel"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_solver_free_outputs_match_the_original(case, layout):
    cfg_path, weights, reference = CASES[case]
    model, ref = load_reference(cfg_path, LAYOUTS[layout], weights, reference)
    x = ref["input"]
    with torch.no_grad():
        injection, z0 = model.cell_inputs(x)
        f_of_zero = model.fullstage(z0, injection)
        logits_unrolled, info = model(x, train_step=0)
    assert info["fwd"] is None  # unrolled: no solver ran
    for got, want in zip(f_of_zero, ref["f_of_zero"]):
        assert (got - want).abs().max() < 1e-5
    assert (logits_unrolled - ref["logits_unrolled"]).abs().max() < 1e-5
    with torch.no_grad():
        z = z0
        for _ in range(model.deq.pretrain_depth):
            z = model.fullstage(z, injection)
    for got, want in zip(z, ref["z_unrolled"]):
        assert (got - want).abs().max() < 1e-3


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_equilibrium_logits_match_the_original_float64_solve(case, layout):
    cfg_path, weights, reference = CASES[case]
    model, ref = load_reference(cfg_path, SOLVE + LAYOUTS[layout], weights, reference)
    with torch.no_grad():
        logits, info = model(ref["input"])
    assert info["fwd"]["rel_lowest"].max() < 2e-5
    assert (logits - ref["logits_float64"]).abs().max() < 1e-4
    # The unrolled and equilibrium paths differ by far more than the tolerance, so this is a real check.
    assert (ref["logits_unrolled"] - ref["logits_float64"]).abs().max() > 1e-3


def test_equilibrium_states_match_the_original_float64_solve():
    model, ref = load_reference(*CASES["mini4_v1_yaml"][:1], SOLVE, *CASES["mini4_v1_yaml"][1:])
    with torch.no_grad():
        injection, z0 = model.cell_inputs(ref["input"])
        z, _ = model.deq(lambda z: model.fullstage(z, injection), z0)
    for got, want in zip(z, ref["z_star_float64"]):
        assert torch.linalg.norm(got - want) < 1e-3 * torch.linalg.norm(want)


def test_random_init_and_an_aliased_prefixed_copy_load(tmp_path):
    cfg = load_config(REPO / "experiments/cifar/cls_mdeq_TINY.yaml")
    state = torch.load(COMPAT / "cifar_tiny_random_init.pkl", weights_only=True)
    assert any(k.startswith("fullstage_copy.") for k in state)  # the original file carries the aliases
    model = build_model(cfg)
    load_weights(model, COMPAT / "cifar_tiny_random_init.pkl")
    assert torch.equal(model.state_dict()["fullstage.branches.0.blocks.0.conv1.weight_v"],
                       state["fullstage.branches.0.blocks.0.conv1.weight_v"])
    prefixed = {f"model.{k}": v for k, v in state.items()}
    prefixed["loss.criterion.weight"] = torch.ones(19)
    torch.save(prefixed, tmp_path / "prefixed.pth")
    other = build_model(cfg)
    load_weights(other, tmp_path / "prefixed.pth")
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
