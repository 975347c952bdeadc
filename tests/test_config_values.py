"""Config values are checked where the config is loaded: one ConfigError line naming the key, the value, what
is allowed and where it came from; the tools exit 2 before writing anything."""
import os
import re
import subprocess
import sys
from ast import literal_eval

import pytest
import yaml

from deqlab.config import get_defaults, load_config
from deqlab.config.defaults import RULES
from deqlab.config.rules import lookup
from deqlab.errors import ConfigError

from conftest import COMPAT, REPO, needs_compat

QUICKSTART = REPO / "experiments/fashion_mnist/cls_mdeq_quickstart.yaml"

# (key, bad value, a fragment of what the error must say is allowed): the values of issue 6 and the seg keys.
BAD_VALUES = [
    ("DEQ.F_SOLVER", "brodyen", "one of anderson, broyden, fixed_point"),
    ("DEQ.B_SOLVER", "brodyen", "one of anderson, broyden, fixed_point"),
    ("DEQ.GRAD", "iftt", "one of ift, phantom, unrolled"),
    ("DEQ.STOP_MODE", "relative", "one of abs, rel"),
    ("MODEL.DROPOUT", "2.0", "a number in [0, 1)"),
    ("DEQ.F_THRES", "-3", "an int >= 1"),
    ("DEQ.F_THRES", "0", "an int >= 1"),
    ("TRAIN.BATCH_SIZE_PER_GPU", "0", "an int >= 1"),
    ("AMP.DTYPE", "float8", "one of bfloat16, float16"),
    ("LOSS.OHEMTHRES", "1.5", "a number in (0, 1]"),
    ("MODEL.EXTRA.FINAL_CONV_KERNEL", "2", "one of 1, 3"),
    ("DATASET.LABEL_MAPPING", "foo", "one of cityscapes, none"),
    ("TRAIN.IGNORE_LABEL", "300", "an int in [0, 255]"),
]
IDS = [f"{key}={value}" for key, value, _ in BAD_VALUES]


def _flat_defaults(tree=None, prefix=""):
    tree = yaml.safe_load(get_defaults().dump()) if tree is None else tree
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat_defaults(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("key, value, allowed", BAD_VALUES, ids=IDS)
def test_a_bad_value_names_the_key_the_value_what_is_allowed_and_the_source(key, value, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [key, value])
    message = str(err.value)
    assert message.startswith(f"command line: {key} must be ") and "\n" not in message
    assert allowed in message
    assert re.search(rf"got '?{re.escape(value)}'?(;|$)", message), message


def test_a_bad_value_in_a_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("DEQ:\n  GRAD: iftt\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: DEQ\.GRAD must be one of ift, phantom, "
                                          r"unrolled, got 'iftt'; did you mean ift\?$"):
        load_config(path)
    load_config(path, ["DEQ.GRAD", "phantom"])  # the command line fixes it: only the merged value is checked


@pytest.mark.parametrize("override", [
    ["MODEL.DROPOUT", "0.0"], ["DEQ.PHANTOM_TAU", "1.0"], ["LOSS.OHEMTHRES", "1.0"], ["TRAIN.IGNORE_LABEL", "0"],
    ["TRAIN.IGNORE_LABEL", "255"], ["DEQ.F_THRES", "1"], ["WORKERS", "0"], ["PERCENT", "1.0"],
    ["TRAIN.END_EPOCH", "0"], ["MODEL.EXTRA.FINAL_CONV_KERNEL", "3"], ["DATASET.LABEL_MAPPING", "none"],
    ["TRAIN.LR_SCHEDULER", "poly"], ["AMP.DTYPE", "float16"], ["DEVICE", "cuda"],
], ids=lambda o: "=".join(o))
def test_values_at_the_edges_of_what_is_allowed_load(override):
    key, text = override
    value = lookup(load_config(None, override), key)
    assert value == (text if isinstance(value, str) else literal_eval(text))


@pytest.mark.parametrize("override, message", [
    (["DEQ.PHANTOM_TAU", "0"], "DEQ.PHANTOM_TAU must be a number in (0, 1], got 0.0"),
    (["PERCENT", "0"], "PERCENT must be a number in (0, 1], got 0.0"),
    (["WORKERS", "-1"], "WORKERS must be an int >= 0, got -1"),
    (["DEVICE", "gpu"], "DEVICE must be one of auto, cpu, cuda, got 'gpu'"),
    (["CPU_ALLOCATOR", "jemalloc"], "CPU_ALLOCATOR must be one of retain, system, got 'jemalloc'"),
    (["TRAIN.OPTIMIZER", "adamw"], "TRAIN.OPTIMIZER must be one of adam, radam, sgd, got 'adamw'"),
    (["TRAIN.LR", "0"], "TRAIN.LR must be a number > 0, got 0.0"),
    (["DEQ.RAND_F_THRES_DELTA", "-1"], "DEQ.RAND_F_THRES_DELTA must be an int >= 0, got -1"),
    (["MODEL.IMAGE_SIZE", "[32, 0]"], "MODEL.IMAGE_SIZE must be a list of 2 items, each an int >= 1, got [32, 0]"),
    (["LOSS.OHEMKEEP", "-1"], "LOSS.OHEMKEEP must be an int >= 0, got -1"),
    (["TRAIN.DOWNSAMPLERATE", "0"], "TRAIN.DOWNSAMPLERATE must be an int >= 1, got 0"),
    (["DATASET.DATASET", "cifar"], "did you mean cifar10?"),
])
def test_more_rules(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, override)


def test_cross_key_rules_name_the_other_key_its_value_and_both_sources():
    with pytest.raises(ConfigError, match=re.escape(
            f"{QUICKSTART}, command line: TRAIN.END_EPOCH must be an int >= TRAIN.BEGIN_EPOCH (9), got 4")):
        load_config(QUICKSTART, ["TRAIN.BEGIN_EPOCH", "9"])
    with pytest.raises(ConfigError, match=re.escape(
            "command line: MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS must be a list of MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES "
            "(3) items")):
        load_config(None, ["MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES", "3"])
    with pytest.raises(ConfigError, match=re.escape("HEAD_CHANNELS must be a list of at least")):
        load_config(None, ["MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS", "[8, 16]"])
    # GroupNorm: channels must split into NUM_GROUPS groups, and the post-fusion norms use NUM_GROUPS // 2.
    with pytest.raises(ConfigError, match=re.escape("multiple of MODEL.NUM_GROUPS (16), got [32, 64, 8, 256]")):
        load_config(None, ["MODEL.NUM_GROUPS", "16", "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[32, 64, 8, 256]"])
    with pytest.raises(ConfigError, match=re.escape("MODEL.NUM_GROUPS must be an int >= 2 and a multiple of 2")):
        load_config(None, ["MODEL.NUM_GROUPS", "1"])
    cfg = load_config(None, ["TRAIN.BEGIN_EPOCH", "5", "TRAIN.END_EPOCH", "5"])
    assert cfg.TRAIN.END_EPOCH == cfg.TRAIN.BEGIN_EPOCH == 5


def test_names_are_case_insensitive_exactly_where_the_code_lowercases_them():
    cfg = load_config(None, ["TRAIN.OPTIMIZER", "SGD", "TRAIN.LR_SCHEDULER", "Cosine", "DATASET.DATASET", "CIFAR10"])
    assert (cfg.TRAIN.OPTIMIZER, cfg.DATASET.DATASET) == ("SGD", "CIFAR10")  # kept as written
    with pytest.raises(ConfigError, match="did you mean broyden"):  # get_solver looks names up as written
        load_config(None, ["DEQ.F_SOLVER", "Broyden"])


def test_solver_and_dataset_choices_come_from_their_registries():
    from deqlab.data import DATASETS
    from deqlab.solvers import SOLVERS, register_solver

    with pytest.raises(ConfigError) as err:
        load_config(None, ["DATASET.DATASET", "nope"])
    assert f"one of {', '.join(sorted(DATASETS))}, got" in str(err.value)
    register_solver("test_only_solver", SOLVERS["fixed_point"])
    try:
        assert load_config(None, ["DEQ.F_SOLVER", "test_only_solver"]).DEQ.F_SOLVER == "test_only_solver"
    finally:
        del SOLVERS["test_only_solver"]
    with pytest.raises(ConfigError, match="F_SOLVER must be one of"):
        load_config(None, ["DEQ.F_SOLVER", "test_only_solver"])


def test_every_key_but_the_booleans_declares_its_rule_and_every_rule_names_a_key():
    defaults = dict(_flat_defaults())
    assert set(RULES) <= set(defaults), set(RULES) - set(defaults)
    undeclared = [k for k, v in defaults.items() if k not in RULES and not isinstance(v, bool)]
    assert not undeclared, f"add a rule for {undeclared} in lib/config/defaults.py (allow(...))"
    cfg = get_defaults()
    assert [key for key, rule in RULES.items() if not rule.ok(lookup(cfg, key), cfg)] == []


def test_keys_marked_unused_are_read_nowhere():
    unused = sorted(key for key, rule in RULES.items() if rule.unused)
    assert {"GPUS", "MODEL.EXTRA.FULL_STAGE.BLOCK"} <= set(unused)
    sources = [p for d in ("lib", "tools") for p in (REPO / d).rglob("*.py") if p.parent.name != "config"]
    code = "\n".join(p.read_text() for p in sources)
    read = [key for key in unused if re.search(rf"\.{key.rsplit('.', 1)[-1]}\b", code)]
    assert not read, f"{read} are read by the code: drop unused(...) from their rules in defaults.py"


def _core_settings():
    from deqlab.deq import DEQ
    from deqlab.layers import VariationalDropout2d, norm_conv2d
    from deqlab.solvers import get_solver, memory_options

    # (what the core is given, its message naming its own argument, the same value through the config)
    return [
        (lambda: DEQ(grad="iftt"), "grad='iftt'", ["DEQ.GRAD", "iftt"]),
        (lambda: DEQ(stop_mode="relative"), "stop_mode 'relative'", ["DEQ.STOP_MODE", "relative"]),
        (lambda: DEQ(grad="phantom", phantom_tau=0.0), "phantom_tau", ["DEQ.GRAD", "phantom", "DEQ.PHANTOM_TAU", "0"]),
        (lambda: DEQ(f_max_iter=0), "max_iter must be >= 1", ["DEQ.F_THRES", "0"]),
        (lambda: VariationalDropout2d(2.0), "dropout rate p", ["MODEL.DROPOUT", "2.0"]),
        (lambda: get_solver("brodyen"), "unknown solver 'brodyen'", ["DEQ.F_SOLVER", "brodyen"]),
        (lambda: memory_options("fixed_point", 2), "memory=2", ["DEQ.F_SOLVER", "fixed_point", "DEQ.F_SOLVER_MEMORY", "2"]),
        (lambda: norm_conv2d("batch_norm", 2, 2, 1), "norm='batch_norm'", ["MODEL.NORM_TYPE", "batch_norm"]),
    ]


def test_the_core_raises_plain_valueerrors_and_the_config_names_the_key():
    """The core (deq, solvers, layers) knows its arguments, not the config keys: a plain ValueError about the
    argument; the same value through the config is a ConfigError naming the key it was set with."""
    assert issubclass(ConfigError, ValueError)
    for build, message, overrides in _core_settings():
        with pytest.raises(ValueError, match=re.escape(message)) as err:
            build()
        assert type(err.value) is ValueError and not re.search(r"\b(DEQ|MODEL)\.", str(err.value)), err.value
        key = overrides[-2]
        with pytest.raises(ConfigError, match=rf"^command line: {re.escape(key)} must be .*got") as err:
            load_config(None, overrides)


def test_the_core_imports_no_config():
    core = [REPO / "lib/deq.py", REPO / "lib/layers.py", *sorted((REPO / "lib/solvers").glob("*.py"))]
    for path in core:
        text = path.read_text()
        assert "deqlab.config" not in text and "ConfigError" not in text, path


@needs_compat
@pytest.mark.parametrize("path", sorted((COMPAT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_compat_configs_load(path, recwarn):
    cfg = load_config(path)
    assert cfg.MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS and cfg.is_frozen()


def test_importing_the_config_does_not_import_torch():
    code = "import sys, deqlab.config; assert 'torch' not in sys.modules, 'deqlab.config imported torch'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("key, value, allowed", BAD_VALUES, ids=IDS)
def test_train_tool_refuses_a_bad_value_before_writing_anything(key, value, allowed, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    cmd = [sys.executable, str(REPO / "tools/cls_train.py"), "--cfg", str(QUICKSTART),
           "OUTPUT_DIR", str(tmp_path / "out"), "LOG_DIR", str(tmp_path / "log"), key, value]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: command line: {key} must be ") and allowed in lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "log").exists()
    assert not any(work.iterdir())  # nothing relative to the working directory either
