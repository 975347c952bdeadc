"""Config loading: every shipped YAML and the original repositories' layouts load; bad input names its source."""

import pytest

from deqlab.config import dump_config, get_defaults, load_config
from deqlab.errors import ConfigError

from conftest import COMPAT, REPO, needs_compat

SHIPPED = sorted(REPO.glob("experiments/**/*.yaml"))
V1_MINI4 = COMPAT / "configs" / "v1_cls_mdeq_MINI4.yaml"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_yaml_loads_against_the_defaults(path):
    cfg = load_config(path)
    assert cfg.is_frozen() and cfg.VERSION == get_defaults().VERSION


def test_shipped_yamls_exist():
    names = {str(p.relative_to(REPO / "experiments")) for p in SHIPPED}
    assert {"cifar/cls_mdeq_TINY.yaml", "cifar/cls_mdeq_LARGE.yaml", "imagenet/cls_mdeq_SMALL.yaml",
            "imagenet/cls_mdeq_LARGE.yaml", "imagenet/cls_mdeq_XL.yaml"} <= names


@needs_compat
def test_v1_thresholds_under_model_are_mapped_to_deq(recwarn):
    cfg = load_config(V1_MINI4)
    assert (cfg.DEQ.F_THRES, cfg.DEQ.B_THRES) == (26, 27)
    assert any("DEBUG.DEBUG" in str(w.message) for w in recwarn)
    cfg = load_config(V1_MINI4, ["MODEL.F_THRES", "12"])  # an old command line still works
    assert cfg.DEQ.F_THRES == 12


def test_overrides_are_typed_like_the_defaults(tmp_path):
    cfg = load_config(REPO / "experiments/cifar/cls_mdeq_TINY.yaml",
                      ["DEQ.F_THRES", "20", "TRAIN.LR", "1e-3", "TRAIN.RESUME", "True", "GPUS", "(0,1)",
                       "TEST.MODEL_FILE", "x.pkl", "MODEL.IMAGE_SIZE", "[28, 28]"])
    assert cfg.DEQ.F_THRES == 20 and cfg.TRAIN.LR == 1e-3 and cfg.TRAIN.RESUME is True
    assert cfg.GPUS == (0, 1) and cfg.TEST.MODEL_FILE == "x.pkl" and cfg.MODEL.IMAGE_SIZE == [28, 28]


def test_yaml_integers_are_accepted_for_float_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("TRAIN:\n  LR: 1\n  WD: 1e-4\n")  # PyYAML reads 1e-4 as a string
    cfg = load_config(path)
    assert cfg.TRAIN.LR == 1.0 and isinstance(cfg.TRAIN.LR, float) and cfg.TRAIN.WD == 1e-4


def test_unknown_key_in_a_yaml_names_the_key_the_file_and_a_close_match(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("DEQ:\n  F_THRESH: 10\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown config key DEQ\.F_THRESH; did you mean DEQ\.F_THRES"):
        load_config(path)


def test_unknown_key_on_the_command_line():
    with pytest.raises(ConfigError, match="command line: unknown config key TRAIN.EPOCHS"):
        load_config(None, ["TRAIN.EPOCHS", "3"])


def test_a_section_is_not_a_value():
    with pytest.raises(ConfigError, match="unknown config key DEQ"):
        load_config(None, ["DEQ", "3"])


@pytest.mark.parametrize("override, expected", [
    (["DEQ.F_THRES", "abc"], "DEQ.F_THRES expects int"),
    (["TRAIN.RESUME", "1"], "TRAIN.RESUME expects bool"),
    (["MODEL.IMAGE_SIZE", "32"], "MODEL.IMAGE_SIZE expects list"),
    (["DEQ.F_THRES"], "has no value"),
])
def test_wrong_value_types_are_rejected(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, override)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="top level"):
        load_config(scalar)


def test_dumped_config_loads_back_to_the_same_values(tmp_path):
    cfg = load_config(REPO / "experiments/imagenet/cls_mdeq_SMALL.yaml", ["DEQ.GRAD", "phantom"])
    dump_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg
