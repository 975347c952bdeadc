"""The README's shell blocks, run as written: every fenced ``bash``/``sh`` block of README.md runs with ``bash -e``
in a scratch copy of the repository's layout whose ``data/`` holds tiny datasets in the real formats, with each
task's tools given a tiny budget (``tests/readme_runner.py`` appends it as KEY VALUE pairs and runs the tools in
forked children of one Python that imported torch once). Blocks run in README order and may use what earlier ones
wrote (the CIFAR sweeps read the run the training block wrote). A block that cannot run here must be on SKIP, with
the reason; a block on neither list that fails, and a list entry that matches no block, fail the test, so a new
README command is run or consciously listed."""
import ast
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, import_tool, write_fashion_mnist

pytestmark = [pytest.mark.timeout(900), pytest.mark.xdist_group("readme")]
RUNNER = Path(__file__).with_name("readme_runner.py")

# The first line of a block (a prefix of it) -> why the block does not run in this test.
SKIP = {
    "bash scripts/quickstart.sh   #": "scripts/test.sh installs the extras and runs this whole suite (it would run "
                                      "itself); quickstart.sh runs end to end in tests/test_quickstart.py",
    "pip install -e .": "installs: would repoint the installed deqlab package at this scratch copy (the extras it "
                        "names are checked against setup.py below)",
    "torchrun --standalone --nproc_per_node 4": "4 GPU processes",
    "torchrun --nnodes 2 --nproc_per_node 8": "two machines of 8 GPUs; tests/test_multinode.py runs this command as "
                                              "two one-process agents on one machine",
    "#!/bin/bash": "a SLURM cluster (sbatch, srun, scontrol) of GPU nodes",
    "python tools/cls_train.py --cfg experiments/cifar/cls_mdeq_small_phantom.yaml":
        "its torchrun line trains the large phantom recipe on 2 GPUs",
    "python tools/sweep.py --cfg experiments/fashion_mnist/cls_mdeq_quickstart.yaml":
        "placeholder arguments (--checkpoint ..., [more.csv ...]); tools/sweep.py runs in tests/test_sweep.py",
    "pip install -e '.[dali]'": "GPUs, the real ImageNet and the released checkpoints (and an install)",
    "python -m torch.distributed.launch --nproc_per_node=4 tools/seg_train.py":
        "the real Cityscapes, 4 GPUs and the released checkpoints",
    "python tools/make_austen_corpus.py": "network: apt-get download (Debian) or Project Gutenberg; the builder's "
                                          "parsing runs offline in tests/test_lm_data.py and tests/test_gutenberg.py",
    "# WikiText-103": "the real WikiText-103, GPUs (--multi_gpu, torchrun) and the released checkpoint",
    "python tools/cls_valid.py --cfg experiments/imagenet/cls_mdeq_SMALL.yaml":
        "the released checkpoint pretrained_models/MDEQ_Small_Cls.pkl and the real ImageNet",
}


def readme_blocks() -> list[tuple[int, str]]:
    """(line number, text) of every fenced shell block of README.md."""
    text = (REPO / "README.md").read_text()
    return [(text[:m.start()].count("\n") + 1, m.group(2))
            for m in re.finditer(r"^```(bash|sh|shell|console)\n(.*?)^```", text, re.M | re.S)]


def listed(block: str, table: dict) -> str | None:
    first = block.lstrip("\n").splitlines()[0]
    keys = [key for key in table if first.startswith(key)]
    assert len(keys) <= 1, f"several entries match the block {first!r}: {keys}"
    return table[keys[0]] if keys else None


BLOCKS = readme_blocks()


def write_cifar10(root: Path, n: int = 8, seed: int = 0) -> None:
    """The python version's pickles (5 train batches + test_batch + batches.meta) with ``n`` images each."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, size=n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))


def write_image_folders(root: Path, per_class: int = 2, seed: int = 0) -> None:
    """``root/{train,val}/class_k/*.JPEG``: small random RGB JPEGs, two classes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for k in range(2):
            (root / split / f"class_{k}").mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(int(rng.integers(20, 40)), 36, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"class_{k}" / f"{i}.JPEG")


def write_austen(root: Path, seed: int = 0) -> None:
    """A tiny corpus in the Austen builder's layout, built by the builder from six made-up 'novels'."""
    austen = import_tool("corpora.austen")
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(60)]
    novels = {name: ["CHAPTER I", ""] + [" ".join(rng.choice(words, size=12)) + "." for _ in range(40)]
              for name in austen.NOVELS}
    austen.build_corpus(novels, root / "austen", min_count=2, log=lambda msg: None)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch copy of the repository's layout with tiny data, a ``python`` that goes through the runner, and
    the environment the blocks run in."""
    work = tmp_path_factory.mktemp("readme")
    for name in ("tools", "scripts"):  # copied: a tool finds the repository through its own path
        shutil.copytree(REPO / name, work / name)
    for name in ("experiments", "pretrained_models"):
        (work / name).symlink_to(REPO / name)
    data = work / "data"
    write_fashion_mnist(data)
    write_cifar10(data)
    write_image_folders(data / "imagenet")
    write_austen(data)
    bin_dir = work.parent / f"{work.name}-bin"
    bin_dir.mkdir()
    for name in ("python", "python3"):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {sys.executable} {RUNNER} "$@"\n')
        (bin_dir / name).chmod(0o755)
    sock = str(work.parent / f"{work.name}.sock")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DEQLAB_NO_INSTALL": "1",
           "DEQLAB_ALLOW_DOWNLOAD": "0", "MPLBACKEND": "Agg", "DEQLAB_README_SOCKET": sock,
           "OMP_NUM_THREADS": "1"}  # tiny models gain nothing from threads, which spin on a busy machine
    server = subprocess.Popen([sys.executable, str(RUNNER), "--serve", sock], env=env)
    deadline = time.monotonic() + 300
    while not os.path.exists(sock):
        assert server.poll() is None and time.monotonic() < deadline, "the README command server did not start"
        time.sleep(0.1)
    yield work, env
    server.terminate()
    server.wait(timeout=30)


@pytest.mark.parametrize("line,block", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line, block, workdir):
    reason = listed(block, SKIP)
    if reason:
        pytest.skip(f"README.md:{line}: {reason}")
    work, env = workdir
    run = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block], cwd=work, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, (f"README.md:{line} failed (exit {run.returncode}); if it cannot run in a test, "
                                 f"add it to SKIP with the reason:\n{block}\n{run.stderr[-4000:]}")


def test_readme_skip_lists_name_existing_blocks(capsys):
    """Every entry of SKIP matches exactly one block; prints the list."""
    for key in SKIP:
        matches = [line for line, block in BLOCKS if block.lstrip("\n").splitlines()[0].startswith(key)]
        assert len(matches) == 1, f"{key!r} matches README blocks at lines {matches}, not exactly one"
    with capsys.disabled():
        print("\nREADME blocks not run by tests/test_readme.py:")
        for line, block in BLOCKS:
            reason = listed(block, SKIP)
            if reason:
                print(f"  README.md:{line}: {block.lstrip().splitlines()[0][:70]!r}: {reason}")


def test_readme_install_commands_name_real_extras():
    """The install blocks are not run (they would repoint the package); the extras they name must exist."""
    tree = ast.parse((REPO / "setup.py").read_text())
    extras = next(node.value for node in ast.walk(tree) if isinstance(node, ast.keyword)
                  and node.arg == "extras_require")
    defined = {ast.literal_eval(key) for key in extras.keys}
    text = (REPO / "README.md").read_text()
    named = {extra for group in re.findall(r"pip install -e '\.\[([\w,]+)\]'", text) for extra in group.split(",")}
    assert named and named <= defined, f"README names extras {sorted(named - defined)} that setup.py lacks"
    assert "tb" in named  # tensorboard --logdir needs one
    assert re.search(r"\.\[test,dali,lm\]", (REPO / "scripts/test.sh").read_text())
