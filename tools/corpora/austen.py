"""A WikiText-layout word-level corpus from Jane Austen's six novels (Debian's ``r-cran-janeaustenr``, or
Project Gutenberg's ebooks where apt cannot fetch it: ``gutenberg.py`` beside this file). A build tool of
``tools/make_austen_corpus.py``, not part of the ``deqlab`` package.

Source: the package's R lazy-load database ``janeaustenr/data/Rdata.{rdx,rdb}`` (one character vector per
novel, one element per printed line), read with PyPI ``rdata``; the ``.deb`` comes from ``apt-get download
r-cran-janeaustenr`` and is read in Python (ar + tar; ``dpkg-deb -x`` as a fallback), or pass the folder.

Layout (``tools/make_austen_corpus.py`` writes it; :func:`deqlab.data.lm.load_corpus` reads it):

- splits by novel: train = Emma, Mansfield Park, Pride and Prejudice, Sense and Sensibility; valid =
  Northanger Abbey; test = Persuasion.
- one line per paragraph (consecutive non-blank lines of the book joined), with a leading and a trailing
  space as in WikiText; no blank lines. Each novel opens with a WikiText title line `` = Emma = ``;
  chapter and volume headings become section lines `` = = Chapter 12 = = `` / `` = = Volume 2 = = `` (Roman
  numerals as Arabic). Dropped: the front matter before the first heading (title page, byline, Northanger
  Abbey's one-paragraph "Advertisement"), "THE END"/"FINIS" lines, ``* * *`` separators, bracketed
  edition notes (``[At this point in the first and second editions ...]``) and Northanger Abbey's
  closing editor's "A NOTE ON THE TEXT".
- tokens: :func:`deqlab.data.lm.tokenize` (WikiText/Moses style; ``tools/lm_generate.py`` tokenises prompts
  with it too).
- closed vocabulary: a token seen fewer than ``min_count`` (default 3) times in train is ``<unk>`` in every
  split, as is any valid/test token not kept from train, so valid/test never hold an out-of-vocabulary token.
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
import warnings
import zlib
from collections import Counter
from pathlib import Path
from typing import Callable

from deqlab.data.lm import UNK, load_corpus, tokenize, unigram_perplexity
from deqlab.errors import DatasetError
from deqlab.utils.files import atomic_open

from . import gutenberg

__all__ = ["NOVELS", "SPLIT_NOVELS", "paragraphs", "novel_to_lines", "close_vocabulary", "format_line",
           "read_lazyload", "read_rdata_dir", "read_deb", "download_deb", "build_corpus", "load_novels"]

NOVELS = {"emma": "Emma", "mansfieldpark": "Mansfield Park", "northangerabbey": "Northanger Abbey",
          "persuasion": "Persuasion", "prideprejudice": "Pride and Prejudice",
          "sensesensibility": "Sense and Sensibility"}
SPLIT_NOVELS = {"train": ("emma", "mansfieldpark", "prideprejudice", "sensesensibility"),
                "valid": ("northangerabbey",), "test": ("persuasion",)}
PACKAGE = "r-cran-janeaustenr"
RDATA_SUBDIR = "usr/lib/R/site-library/janeaustenr/data"
INSTALL_HINT = (f"get the Debian package with `apt-get download {PACKAGE}` (e.g. on another machine) and pass "
                f"--deb PATH, or pass --rdata-dir pointing at an extracted .../janeaustenr/data folder (Rdata.rdx, "
                f"Rdata.rdb), or --gutenberg-url a folder or mirror holding Project Gutenberg's <n>/pg<n>.txt files")

_HEADING = re.compile(r"^(CHAPTER|Chapter|VOLUME|Volume)\s+([IVXLC]+|\d+)\.?$")
_ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100}


def _roman(numeral: str) -> int:
    if numeral.isdigit():
        return int(numeral)
    values = [_ROMAN[c] for c in numeral]
    return sum(-v if i + 1 < len(values) and v < values[i + 1] else v for i, v in enumerate(values))


def paragraphs(lines: list[str]) -> list[str]:
    """Consecutive non-blank lines joined by single spaces (inner whitespace collapsed)."""
    out, current = [], []
    for line in list(lines) + [""]:
        if line.strip():
            current.append(" ".join(line.split()))
        elif current:
            out.append(" ".join(current))
            current = []
    return out


def _dropped(par: str) -> bool:
    return (par.upper() in {"THE END", "FINIS"} or not par.replace("*", "").strip()
            or (par.startswith("[") and "edition" in par.lower()))


def novel_to_lines(name: str, lines: list[str]) -> list[list[str]]:
    """Token lists of one novel's output lines: its `` = Title = `` line, then headings and paragraphs."""
    out = [["=", *tokenize(NOVELS.get(name, name)), "="]]
    started = False
    # a heading line is a paragraph of its own even without blank lines around it
    lines = [part for line in lines for part in (["", line, ""] if _HEADING.match(line.strip()) else [line])]
    for par in paragraphs(lines):
        if par == "A NOTE ON THE TEXT":  # Northanger Abbey's closing editor's note
            break
        heading = _HEADING.match(par)
        if heading:
            started = True
            out.append(["=", "=", heading.group(1).capitalize(), str(_roman(heading.group(2))), "=", "="])
        elif started and not _dropped(par) and (tokens := tokenize(par)):
            out.append(tokens)
    return out


def close_vocabulary(splits: dict[str, list[list[str]]], min_count: int = 3) -> tuple[dict[str, list[list[str]]], set]:
    """Replace train tokens seen fewer than ``min_count`` times in train, and valid/test tokens not kept, by
    ``<unk>``. Returns the new splits and the kept word types."""
    counts = Counter(t for line in splits["train"] for t in line)
    kept = {t for t, c in counts.items() if c >= min_count}
    return {s: [[t if t in kept else UNK for t in line] for line in lines] for s, lines in splits.items()}, kept


def format_line(tokens: list[str]) -> str:
    """A WikiText line: a leading and a trailing space around the space-joined tokens."""
    return " " + " ".join(tokens) + " \n"


def _import_rdata():
    try:
        import rdata  # noqa: F401
        import rdata.conversion
        import rdata.parser
    except ImportError as err:
        raise DatasetError(f"reading R's lazy-load database needs the Python package rdata ({err}): "
                           f"pip install 'rdata>=1.0' (or pip install -e '.[lm]')") from None
    return rdata


def _r_object(payload: bytes):
    rdata = _import_rdata()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unknown file type")
        return rdata.conversion.convert(rdata.parser.parse_data(payload))


def read_lazyload(rdx: bytes, rdb: bytes) -> dict[str, list[str]]:
    """Every variable of an R lazy-load database (``Rdata.rdx`` index bytes, ``Rdata.rdb`` bytes) that is a
    character vector, as a list of strings (NA as ""). The index is a gzip-compressed serialized list whose
    ``variables`` map names to (offset, length) in the .rdb; each object there is a 4-byte big-endian length
    plus a zlib stream (or, for R's compress=2/3, a type byte '2' bzip2 / 'Z' xz / '0' none and the data)."""
    try:
        index = _r_object(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx))
        variables = index["variables"]
    except DatasetError:
        raise
    except Exception as err:
        raise DatasetError(f"cannot read the R lazy-load index (Rdata.rdx): {err}") from None
    out = {}
    for name, (offset, length) in variables.items():
        blob = rdb[int(offset): int(offset) + int(length)]
        size, rest = int.from_bytes(blob[:4], "big"), blob[4:]
        try:
            kind = rest[:1]
            payload = (lzma.decompress(rest[1:]) if kind == b"Z" else bz2.decompress(rest[1:]) if kind == b"2"
                       else rest[1:] if kind == b"0" else zlib.decompress(rest))
            if len(payload) != size:
                raise ValueError(f"{len(payload)} bytes, index says {size}")
            obj = _r_object(payload)
        except Exception as err:
            raise DatasetError(f"cannot read object {name!r} of Rdata.rdb: {err}") from None
        if getattr(obj, "dtype", None) is not None and obj.dtype.kind in "UO":
            out[str(name)] = ["" if x is None else str(x) for x in obj.tolist()]
    return out


def read_rdata_dir(path: str | Path) -> dict[str, list[str]]:
    """The novels from a folder holding ``Rdata.rdx``/``Rdata.rdb`` (or an extracted package tree above it)."""
    path = Path(path)
    candidates = [path, path / RDATA_SUBDIR, path / "janeaustenr" / "data", path / "data"]
    for folder in candidates:
        if (folder / "Rdata.rdx").is_file() and (folder / "Rdata.rdb").is_file():
            return read_lazyload((folder / "Rdata.rdx").read_bytes(), (folder / "Rdata.rdb").read_bytes())
    raise DatasetError(f"no Rdata.rdx/Rdata.rdb under {path} (looked in {', '.join(str(c) for c in candidates)}); "
                       f"{INSTALL_HINT}")


def _ar_members(data: bytes) -> dict[str, bytes]:
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive")
    pos, members = 8, {}
    while pos + 60 <= len(data):
        header = data[pos: pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        members[name] = data[pos + 60: pos + 60 + size]
        pos += 60 + size + (size & 1)
    return members


def read_deb(deb: str | Path) -> dict[str, list[str]]:
    """The novels from the ``r-cran-janeaustenr`` .deb: read in Python (ar + tar), else ``dpkg-deb -x``."""
    deb = Path(deb)
    if not deb.is_file():
        raise DatasetError(f"{deb} does not exist; {INSTALL_HINT}")
    try:
        members = _ar_members(deb.read_bytes())
        name = next(n for n in members if n.startswith("data.tar"))
        with tarfile.open(fileobj=io.BytesIO(members[name]), mode="r:*") as tar:
            files = {Path(m.name).name: tar.extractfile(m).read() for m in tar.getmembers()
                     if m.isfile() and m.name.lstrip("./").startswith(RDATA_SUBDIR + "/Rdata.rd")}
        return read_lazyload(files["Rdata.rdx"], files["Rdata.rdb"])
    except DatasetError:
        raise
    except Exception as err:  # e.g. a zstd data.tar this Python cannot open
        if shutil.which("dpkg-deb") is None:
            raise DatasetError(f"cannot read {deb} ({err}) and dpkg-deb is not installed; extract it yourself and "
                               f"pass --rdata-dir .../{RDATA_SUBDIR}") from None
        with tempfile.TemporaryDirectory() as tmp:
            run = subprocess.run(["dpkg-deb", "-x", str(deb), tmp], capture_output=True, text=True)
            if run.returncode:
                raise DatasetError(f"dpkg-deb -x {deb} failed: {run.stderr.strip().splitlines()[-1:]}") from None
            return read_rdata_dir(Path(tmp) / RDATA_SUBDIR)


def download_deb(dest: str | Path) -> Path:
    """``apt-get download r-cran-janeaustenr`` into ``dest``; returns the .deb's path."""
    if shutil.which("apt-get") is None:
        raise DatasetError(f"apt-get is not available to download {PACKAGE}")
    run = subprocess.run(["apt-get", "download", PACKAGE], cwd=dest, capture_output=True, text=True)
    debs = sorted(Path(dest).glob(f"{PACKAGE}_*.deb"))
    if run.returncode or not debs:
        last = (run.stderr.strip().splitlines() or ["no .deb written"])[-1]
        raise DatasetError(f"apt-get download {PACKAGE} failed ({last}; apt-get update may help)")
    return debs[-1]


def _from_gutenberg(base_url: str, opener: gutenberg.Opener, log: Callable[[str], None],
                    apt_error: DatasetError | None = None) -> tuple[dict[str, list[str]], dict]:
    try:
        novels = gutenberg.download_novels(base_url, opener, log)
    except DatasetError as err:
        apt = f"apt-get: {apt_error}; " if apt_error else ""
        raise DatasetError(f"cannot get the novels ({apt}Project Gutenberg: {err}); {INSTALL_HINT}") from None
    return novels, {"gutenberg": base_url, "ebooks": gutenberg.EBOOKS}


def load_novels(deb: str | Path | None = None, rdata_dir: str | Path | None = None,
                log: Callable[[str], None] = print, use_gutenberg: bool = False,
                gutenberg_url: str = gutenberg.BASE_URL, fetch_deb: Callable[[str], Path] | None = None,
                opener: gutenberg.Opener = urllib.request.urlopen) -> tuple[dict[str, list[str]], dict]:
    """The six novels' lines and a description of where they came from: ``rdata_dir``, ``deb``, Project
    Gutenberg (``use_gutenberg``), or else ``apt-get download`` (``fetch_deb(folder)``, :func:`download_deb` by
    default) with Project Gutenberg as the fallback when that fails."""
    if rdata_dir is not None:
        log(f"reading the R lazy-load database under {rdata_dir}")
        novels, source = read_rdata_dir(rdata_dir), {"rdata_dir": str(rdata_dir)}
    elif deb is None and use_gutenberg:
        novels, source = _from_gutenberg(gutenberg_url, opener, log)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            if deb is None:
                log(f"downloading {PACKAGE} with apt-get download")
                try:
                    deb = (fetch_deb or download_deb)(tmp)
                except DatasetError as apt_error:
                    log(f"{apt_error}; downloading the novels from Project Gutenberg instead")
                    novels, source = _from_gutenberg(gutenberg_url, opener, log, apt_error)
            if deb is not None:
                log(f"reading {deb}")
                digest = hashlib.sha256(Path(deb).read_bytes()).hexdigest()
                novels, source = read_deb(deb), {"deb": Path(deb).name, "sha256": digest}
    missing = sorted(set(NOVELS) - set(novels))
    if missing:
        raise DatasetError(f"the janeaustenr data lacks {', '.join(missing)} (found {', '.join(sorted(novels))})")
    return novels, source


def _write(path: Path, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def build_corpus(novels: dict[str, list[str]], out_dir: str | Path, min_count: int = 3, force: bool = False,
                 source: dict | None = None, log: Callable[[str], None] = print) -> dict:
    """Write ``out_dir/{train,valid,test}.txt`` (each atomically, train.txt last), ``stats.json`` and
    ``README.md``; refuses to overwrite an existing corpus unless ``force``. Returns the stats."""
    out_dir = Path(out_dir)
    existing = [str(out_dir / f"{s}.txt") for s in SPLIT_NOVELS if (out_dir / f"{s}.txt").exists()]
    if existing and not force:
        raise DatasetError(f"{', '.join(existing)} already exist; pass --force to overwrite")
    if min_count < 1:
        raise DatasetError(f"--min-count must be >= 1, got {min_count}")
    raw = {}
    for split, names in SPLIT_NOVELS.items():
        raw[split] = []
        for name in names:
            log(f"tokenising {name} ({len(novels[name])} lines) -> {split}")
            raw[split] += novel_to_lines(name, novels[name])
    closed, _ = close_vocabulary(raw, min_count)
    has_unk = {s: any(t == UNK for line in lines for t in line) for s, lines in closed.items()}
    if not has_unk["train"] and (has_unk["valid"] or has_unk["test"]):
        raise DatasetError(f"with --min-count {min_count} train keeps every word, so it has no {UNK} for the "
                           f"valid/test words it never saw; use --min-count 2 or more")
    for split in ("valid", "test", "train"):
        _write(out_dir / f"{split}.txt", "".join(format_line(line) for line in closed[split]))
        log(f"wrote {out_dir / f'{split}.txt'} ({len(closed[split])} lines)")
    corpus = load_corpus(out_dir)
    stats = {"source": source or {}, "min_count": min_count, "vocab_size": len(corpus.vocab),
             "train_types_before_closing": len({t for line in raw["train"] for t in line}), "splits": {}}
    for split, lines in closed.items():
        words = sum(len(line) for line in lines)
        unk = sum(t == UNK for line in lines for t in line)
        stats["splits"][split] = {
            "novels": list(SPLIT_NOVELS[split]), "lines": len(lines), "words": words,
            "tokens_with_eos": words + len(lines), "unk": unk, "unk_rate": round(unk / max(words, 1), 5),
            "unigram_ppl": round(unigram_perplexity(corpus.train, corpus.split(split), len(corpus.vocab)), 2)}
    _write(out_dir / "stats.json", json.dumps(stats, indent=2) + "\n")
    _write(out_dir / "README.md", _readme(stats))
    return stats


def _readme(stats: dict) -> str:
    rows = "\n".join(f"| {s} | {', '.join(v['novels'])} | {v['lines']:,} | {v['tokens_with_eos']:,} | "
                     f"{100 * v['unk_rate']:.2f}% | {v['unigram_ppl']} |" for s, v in stats["splits"].items())
    origin = "Project Gutenberg's ebooks" if "gutenberg" in stats["source"] else f"Debian's `{PACKAGE}`"
    return (f"# Jane Austen corpus (WikiText layout)\n\nBuilt by `tools/make_austen_corpus.py` from {origin} "
            f"({json.dumps(stats['source'])}). Format: `tools/corpora/austen.py`, tokenisation: "
            f"`deqlab.data.lm.tokenize`. Words seen fewer than {stats['min_count']} times in train are `<unk>`; "
            f"vocabulary {stats['vocab_size']:,} symbols with `<eos>` and `<unk>`.\n\n"
            "| split | novels | lines | tokens (with `<eos>`) | `<unk>` rate | unigram ppl (add-one) |\n"
            f"|---|---|---|---|---|---|\n{rows}\n")
