"""Every tool's and script's ``--help``: its whole description, one example that names itself and files that exist,
and where the config keys are documented; the scripts answer before installing or running anything."""
import ast
import os
import re
import runpy
import subprocess
import sys

import pytest

from conftest import REPO
from deqlab.utils.tool_help import CONFIG_KEYS_EPILOG

TOOLS = sorted(REPO.glob("tools/*.py"))
SCRIPTS = sorted(p for p in REPO.glob("scripts/*.sh") if not p.name.startswith("_"))  # _help.sh is sourced
CONFIG_KEYS_DOC = "lib/config/defaults.py"


def tool_help(tool, capsys, monkeypatch) -> str:
    """``python tools/X.py --help`` as the command line runs it (``__main__``), in this process: importing torch
    once for all tools keeps this test fast."""
    monkeypatch.setattr(sys, "argv", [str(tool), "--help"])
    monkeypatch.syspath_prepend(str(tool.parent))
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(tool), run_name="__main__")
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def check_example(text: str, command: str) -> None:
    """One ``Example:`` whose command runs ``command`` (this tool or script); every file it reads exists."""
    examples = re.findall(r"^Examples?\b.*?:\s*(.*(?:\\\n.*)*)", text, re.M)
    assert len(examples) == 1, f"expected one example in:\n{text}"
    example = examples[0]
    assert command in example.split(), example
    for path in re.findall(r"(?:experiments|scripts|tools)/\S+\.(?:yaml|py|sh)", example):
        assert (REPO / path).is_file(), f"the example names {path}, which does not exist"


@pytest.mark.parametrize("tool", TOOLS, ids=lambda p: p.name)
def test_tool_help_prints_the_whole_docstring_an_example_and_the_config_keys_doc(tool, capsys, monkeypatch):
    out = tool_help(tool, capsys, monkeypatch)
    doc = ast.get_docstring(ast.parse(tool.read_text()))
    # every line of the docstring, not just its first (descriptions used to stop mid-sentence)
    for line in doc.replace("``", "`").replace("::", ":").splitlines():
        assert line.strip() in out, f"{tool.name} --help lacks the docstring line {line.strip()!r}"
    check_example(out, f"tools/{tool.name}")
    assert CONFIG_KEYS_EPILOG in out and CONFIG_KEYS_DOC in CONFIG_KEYS_EPILOG
    assert (REPO / CONFIG_KEYS_DOC).is_file()
    if tool.stem.startswith(("seg_", "lm_")):  # --cfg used to suggest a CIFAR file to every tool
        assert "cifar" not in out.lower()


@pytest.fixture
def pip_tripwire(tmp_path):
    """A PATH whose ``python`` and ``pip`` record any pip call in ``tmp_path/installed`` and fail; every other
    python call goes to the real interpreter."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "installed"
    wrapper = (f'#!/usr/bin/env bash\ncase " $* " in *" pip "*|*" -m pip "*) echo "$0 $*" >> {marker}; exit 1;; esac\n'
               f'exec {sys.executable} "$@"\n')
    for name in ("python", "python3"):
        (bin_dir / name).write_text(wrapper)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "pip").write_text(f'#!/usr/bin/env bash\necho "pip $*" >> {marker}; exit 1\n')
    (bin_dir / "pip").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "DEQLAB_NO_INSTALL"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env, marker


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_help_prints_its_header_and_installs_nothing(script, pip_tripwire, tmp_path):
    env, marker = pip_tripwire
    run = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert not marker.exists(), f"{script.name} --help ran pip: {marker.read_text()}"
    header = []
    for line in script.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        header.append(re.sub(r"^# ?", "", line))
    for line in header:
        assert line in run.stdout, f"{script.name} --help lacks its header line {line!r}"
    check_example(run.stdout, f"scripts/{script.name}")
    assert CONFIG_KEYS_EPILOG in run.stdout  # the tools' words, from the shell helper
    assert not (tmp_path / "output").exists() and not list(tmp_path.glob("*.csv"))  # nothing ran


def test_wt103_script_help_also_lists_its_flags(pip_tripwire, tmp_path):
    env, _ = pip_tripwire
    run = subprocess.run(["bash", str(REPO / "scripts/wt103_deq_transformer.sh"), "--help"], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    flags = run.stdout[run.stdout.index("Example:"):]  # the flag table comes after the header
    assert "usage:" in flags and "--n_layer" in flags and "--gpu0_bsz" in flags
