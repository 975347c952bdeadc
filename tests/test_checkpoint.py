"""Checkpoints: atomic writes, weights-only loads, clear errors, partial transfer."""
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from deqlab.checkpoint import load_checkpoint, load_legacy_pickle, load_weights, save_checkpoint
from deqlab.errors import CheckpointError


class Tiny(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.classifier = nn.Linear(5, classes)


def test_round_trip_keeps_tensors_and_primitives(tmp_path):
    model = Tiny()
    state = {"model": model.state_dict(), "epoch": 3, "best_metric": 0.5, "config": "A: 1\n"}
    save_checkpoint(tmp_path / "ck.pth", state)
    loaded = load_checkpoint(tmp_path / "ck.pth")
    assert loaded["epoch"] == 3 and loaded["config"] == "A: 1\n"
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pth"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "ck.pth").stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would, not mkstemp's 0600


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "ck.pth"
    save_checkpoint(path, {"epoch": 1})
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(path, {"epoch": 2, "bad": Unpicklable()})
    assert path.read_bytes() == before and load_checkpoint(path)["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ck.pth"]


def test_missing_truncated_and_garbage_files_give_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pth")
    save_checkpoint(tmp_path / "full.pth", {"model": Tiny().state_dict()})
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint")
    for name in ("cut.pth", "junk.pth"):
        with pytest.raises(CheckpointError, match=f"{name} is not a readable checkpoint") as err:
            load_checkpoint(tmp_path / name)
        assert "\n" not in str(err.value)


def test_python_objects_need_the_explicit_legacy_loader(tmp_path):
    torch.save({"model": Tiny().state_dict(), "args": Path("x")}, tmp_path / "old.pth")
    with pytest.raises(CheckpointError, match="load_legacy_pickle"):
        load_checkpoint(tmp_path / "old.pth")
    assert load_legacy_pickle(tmp_path / "old.pth")["args"] == Path("x")


def test_load_weights_from_our_checkpoint_and_from_a_ddp_prefixed_state_dict(tmp_path):
    src = Tiny()
    save_checkpoint(tmp_path / "ours.pth", {"model": src.state_dict(), "epoch": 0})
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, tmp_path / "ddp.pth")
    for name in ("ours.pth", "ddp.pth"):
        dst = Tiny()
        load_weights(dst, tmp_path / name)
        assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), src.state_dict().values()))


def test_a_checkpoint_of_another_config_lists_what_does_not_fit(tmp_path):
    torch.save(Tiny(classes=7).state_dict(), tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"wrong shape: classifier\.weight \(7, 5\) vs model \(3, 5\)"):
        load_weights(Tiny(), tmp_path / "other.pth")
    state = Tiny().state_dict()
    state.pop("body.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing: body\.bias; unexpected: extra\.weight"):
        load_weights(Tiny(), tmp_path / "partial.pth")


def test_partial_transfer_skips_the_classifier(tmp_path):
    src = Tiny(classes=7)
    torch.save(src.state_dict(), tmp_path / "pre.pth")
    dst = Tiny()
    before = dst.classifier.weight.clone()
    report = load_weights(dst, tmp_path / "pre.pth", strict=False, exclude=("classifier.",))
    assert torch.equal(dst.body.weight, src.body.weight) and torch.equal(dst.classifier.weight, before)
    assert report["missing"] == [] and report["mismatched"] == []
    assert set(report["dropped"]) == {"classifier.weight", "classifier.bias"}


def test_the_eval_tool_says_what_a_non_checkpoint_file_holds(tiny_run, capsys):
    """tools/cls_valid.py's main (under run_tool, as its __main__ runs it) on files that are not checkpoints: one
    line saying what each holds; a damaged checkpoint's reason in full (it used to be cut at 200 characters)."""
    import collections
    import pickle
    import warnings

    from deqlab.config import load_config
    from deqlab.engine.cli import run_tool
    from deqlab.engine.launch import test_main
    from deqlab.models import build_model

    path, overrides, tmp = tiny_run
    with open(tmp / "list.pkl", "wb") as fh:
        pickle.dump([1, 2, 3], fh)
    with open(tmp / "counter.pkl", "wb") as fh:
        pickle.dump(collections.Counter("abca"), fh, protocol=0)
    torch.save({"epoch": 3, "lr": 0.1}, tmp / "meta.pth")
    save_checkpoint(tmp / "full.pth", {"model": build_model(load_config(path, overrides)).state_dict()})
    data = (tmp / "full.pth").read_bytes()
    (tmp / "cut.pth").write_bytes(data[:4096])  # a copy that stopped after 4 KiB
    with pytest.raises(Exception) as raw:
        torch.load(tmp / "cut.pth", weights_only=True)
    reason = f"{type(raw.value).__name__}: {' '.join(str(raw.value).split())}"
    assert len(reason) > 200
    expected = {
        "list.pkl": "is a plain pickle holding a list, not a checkpoint or state_dict saved with torch.save",
        "counter.pkl": "is a plain pickle holding a collections.Counter, not a checkpoint or state_dict",
        "meta.pth": "holds a dict (keys: epoch, lr), not a checkpoint or state_dict (expected a dict of tensors",
        "cut.pth": f"is not a readable checkpoint (corrupt or truncated?): {reason}",
    }
    for name, message in expected.items():
        argv = ["--cfg", str(path), *overrides, "TEST.MODEL_FILE", str(tmp / name)]
        with pytest.raises(SystemExit) as exit_, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_tool(lambda: test_main("cls", "evaluate", argv))
        assert not [w for w in caught if "pickle" in str(w.message)]  # torch's protocol warning is not shown
        lines = capsys.readouterr().err.splitlines()
        assert exit_.value.code == 2 and len(lines) == 1, lines
        assert lines[0].startswith(f"error: checkpoint {tmp / name} {message}"), lines[0]
    assert lines[0].endswith(reason)  # the whole reason, not a prefix
