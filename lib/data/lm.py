"""Word-level language-model data in the WikiText layout, as locuslab/deq's DEQ-Transformer reads it.

A corpus folder holds ``train.txt``, ``valid.txt`` and ``test.txt`` (WikiText-103: ``wiki.*.tokens`` renamed,
as the original ``get_data.sh`` does). :func:`load_corpus` builds the vocabulary exactly like the original
``data_utils.Corpus(path, 'wt103', special=['<eos>'], lower_case=False)`` -- ``<eos>`` first, then train.txt's
``Counter.most_common()`` order, ties in order of first occurrence -- so the released checkpoint's embedding
rows line up, and encodes each split as one 1-D int64 tensor (every line whitespace-split, then ``<eos>``).

The encoding is cached in ``deqlab_lm_cache.pt`` (a ``torch.save`` of tensors, a list of strings and a key
string; read with ``weights_only=True``), keyed by each text file's size and ``st_mtime_ns``.

:class:`LMOrderedIterator` batches a split like the original ``LMOrderedIterator(data, bsz, bptt, ext_len)``;
:func:`shard_streams` gives each DDP rank its own columns (streams) of the global layout.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from deqlab.errors import DatasetError
from deqlab.utils.files import atomic_open

__all__ = ["EOS", "UNK", "SPLITS", "Vocab", "Corpus", "load_corpus", "count_file", "batchify", "shard_streams",
           "LMOrderedIterator", "unigram_perplexity", "tokenize", "CACHE_NAME"]

EOS, UNK = "<eos>", "<unk>"
SPLITS = ("train", "valid", "test")
CACHE_NAME = "deqlab_lm_cache.pt"
CACHE_VERSION = 1
WT103_HINT = ("WikiText-103: download wikitext-103-v1.zip (locuslab/deq's get_data.sh fetches "
              "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip), unzip it and rename "
              "wiki.{train,valid,test}.tokens to {train,valid,test}.txt; or build the small Jane Austen corpus with "
              "python tools/make_austen_corpus.py")

_TOKEN = re.compile(r"""(?P<dash>-{2,}) | (?P<num>\d+(?:[.,]\d+)+) | (?P<etc>&c\b)
                      | (?P<word>[^\W_]+(?:'[^\W_]+)*) | (?P<other>\S)""", re.X)
_NT = re.compile(r"^(.+?)(n't)$", re.I)
_CLITIC = re.compile(r"^(.+?)('(?:s|m|d|ll|re|ve))$", re.I)


def _split_word(word: str) -> list[str]:
    for pattern in (_NT, _CLITIC):
        m = pattern.match(word)
        if m:
            return [m.group(1), m.group(2)]
    return [word]


def tokenize(text: str) -> list[str]:
    """WikiText-style (Moses) word tokens of one paragraph of plain text, as the Austen corpus is tokenised:

    ``_italic_`` underscores removed; punctuation split off (``word , word .``; every period, "Mr." too); an
    intra-word hyphen is ``@-@`` (``drawing @-@ room``), a run of two or more hyphens the dash token ``--``; digit
    groups ``1 @,@ 000`` / ``3 @.@ 5``; clitics split off as in the Penn Treebank (``Anne 's``, ``do n't``,
    ``ca n't``, ``I 'll``); other inner apostrophes stay in the word (``o'clock``, ``ma'am``); a leading or
    trailing apostrophe is a token of its own; ``&c`` is one token.
    """
    text = text.replace("_", "")
    tokens: list[str] = []
    for m in _TOKEN.finditer(text):
        kind, tok = m.lastgroup, m.group()
        if kind == "dash":
            tokens.append("--")
        elif kind == "num":
            tokens += [{",": "@,@", ".": "@.@"}.get(p, p) for p in re.split(r"([.,])", tok)]
        elif kind == "word":
            tokens += _split_word(tok)
        elif tok == "-" and 0 < m.start() and m.end() < len(text) and text[m.start() - 1].isalnum() \
                and text[m.end()].isalnum():
            tokens.append("@-@")
        else:
            tokens.append(tok)
    return tokens


def _lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, whitespace-split tokens) of a UTF-8 text file, in the original's line splitting
    (text-mode iteration: universal newlines)."""
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            yield lineno, line.split()


def count_file(path: str | os.PathLike, counter: Counter | None = None) -> Counter:
    """Token counts of a file, every line ended by ``<eos>`` (insertion order = order of first occurrence)."""
    counter = Counter() if counter is None else counter
    for _, tokens in _lines(Path(path)):
        counter.update(tokens)
        counter[EOS] += 1
    return counter


class Vocab:
    """An index <-> symbol table; ``idx2sym[i]`` is the symbol of embedding row ``i``."""

    def __init__(self, idx2sym: Sequence[str]):
        self.idx2sym: list[str] = list(idx2sym)
        self.sym2idx: dict[str, int] = {s: i for i, s in enumerate(self.idx2sym)}
        if len(self.sym2idx) != len(self.idx2sym):
            raise DatasetError("vocabulary has duplicate symbols")
        if EOS not in self.sym2idx:
            raise DatasetError(f"vocabulary has no {EOS} symbol")
        self.eos_idx: int = self.sym2idx[EOS]
        self.unk_idx: int | None = self.sym2idx.get(UNK)

    @classmethod
    def from_counter(cls, counter: Counter, special: Sequence[str] = (EOS,)) -> "Vocab":
        """``special`` first, then ``counter.most_common()`` (a stable sort: ties keep first-occurrence order)."""
        symbols = list(dict.fromkeys(special))
        seen = set(symbols)
        symbols += [s for s, _ in counter.most_common() if s not in seen]
        return cls(symbols)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Vocab":
        """The vocabulary of one training file, as the original's ``Corpus(..., 'wt103', ...)`` builds it."""
        return cls.from_counter(count_file(path))

    def __len__(self) -> int:
        return len(self.idx2sym)

    def encode_file(self, path: str | os.PathLike) -> torch.Tensor:
        """1-D int64 tensor of a file, every line followed by ``<eos>``. An out-of-vocabulary token maps to
        ``<unk>`` when the vocabulary has one, otherwise raises :class:`DatasetError` naming token, file and line."""
        path = Path(path)
        s2i, eos, ids = self.sym2idx, self.eos_idx, array("q")
        for lineno, tokens in _lines(path):
            try:
                ids.extend([s2i[t] for t in tokens])
            except KeyError:
                ids.extend([self._oov(t, path, lineno) if t not in s2i else s2i[t] for t in tokens])
            ids.append(eos)
        # frombuffer shares the array's memory and keeps it alive: no copy of a 100M-token split
        return torch.frombuffer(ids, dtype=torch.int64) if len(ids) else torch.zeros(0, dtype=torch.int64)

    def _oov(self, token: str, path: Path, lineno: int) -> int:
        if self.unk_idx is None:
            raise DatasetError(f"{path}:{lineno}: token {token!r} is not in the vocabulary (built from train.txt, "
                               f"which has no {UNK} to map it to)")
        return self.unk_idx

    def decode(self, indices: Iterable[int]) -> str:
        """Symbols of ``indices`` joined by spaces."""
        return " ".join(self.idx2sym[int(i)] for i in indices)


@dataclass
class Corpus:
    """A vocabulary and the three encoded splits (1-D int64 tensors)."""
    vocab: Vocab
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    root: Path
    from_cache: bool = False

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise DatasetError(f"unknown split {name!r}; known: {', '.join(SPLITS)}")
        return getattr(self, name)

    def get_iterator(self, split: str, bsz: int, tgt_len: int, ext_len: int = 0, device: str | torch.device = "cpu",
                     rank: int = 0, world_size: int = 1) -> "LMOrderedIterator":
        """:class:`LMOrderedIterator` over ``split`` (``bsz`` is the global batch)."""
        return LMOrderedIterator(self.split(split), bsz, tgt_len, ext_len, device, rank, world_size)


def _text_files(root: Path) -> dict[str, Path]:
    files = {s: root / f"{s}.txt" for s in SPLITS}
    if not root.is_dir():
        raise DatasetError(f"language-model corpus folder {root} does not exist (expected {root}/train.txt, "
                           f"valid.txt, test.txt). {WT103_HINT}")
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        renamed = " (found wiki.*.tokens there: rename them)" if (root / "wiki.train.tokens").is_file() else ""
        raise DatasetError(f"language-model corpus incomplete: {', '.join(missing)} not found{renamed}. {WT103_HINT}")
    return files


def _cache_key(root: Path, files: dict[str, Path]) -> str:
    """What the cached encoding depends on: format version and each text file's name, size and mtime (ns)."""
    stats = {s: [p.name, p.stat().st_size, p.stat().st_mtime_ns] for s, p in files.items()}
    return json.dumps({"version": CACHE_VERSION, "special": [EOS], "lower_case": False, "files": stats},
                      sort_keys=True)


def cache_path(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """``root/deqlab_lm_cache.pt``, or under ``cache_dir`` a file named by a hash of root's absolute path."""
    root = Path(root)
    if cache_dir is None:
        return root / CACHE_NAME
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"lm-{digest}.pt"


def _read_cache(path: Path, key: str) -> Corpus | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("key") != key:
            return None
        splits = [blob[s] for s in SPLITS]
        if not all(isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.dim() == 1 for t in splits):
            raise ValueError("malformed splits")
        return Corpus(Vocab(blob["idx2sym"]), *splits, root=path.parent, from_cache=True)
    except Exception as err:  # a stale or damaged cache is rebuilt, never trusted
        warnings.warn(f"ignoring unreadable corpus cache {path}: {err}")
        return None


def load_corpus(root: str | os.PathLike, cache: bool = True, cache_dir: str | os.PathLike | None = None) -> Corpus:
    """Read ``root/{train,valid,test}.txt`` (vocabulary from train.txt only), through the cache when allowed.

    The cache (:func:`cache_path`) is rewritten atomically whenever a text file's size or mtime changed; a
    folder that cannot be written (read-only data) just goes without one (a warning says so).
    """
    root = Path(root)
    files = _text_files(root)
    key = _cache_key(root, files)
    target = cache_path(root, cache_dir)
    if cache:
        hit = _read_cache(target, key)
        if hit is not None:
            hit.root = root
            return hit
    vocab = Vocab.from_file(files["train"])
    corpus = Corpus(vocab, *(vocab.encode_file(files[s]) for s in SPLITS), root=root)
    if cache:
        blob = {"format": "deqlab-lm-corpus", "key": key, "idx2sym": vocab.idx2sym,
                **{s: corpus.split(s) for s in SPLITS}}
        try:
            with atomic_open(target, "wb") as fh:
                torch.save(blob, fh)
        except OSError as err:
            warnings.warn(f"could not write the corpus cache {target} ({err}); pass cache_dir= to cache elsewhere")
    return corpus


def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    """The original's layout: trim ``data`` to a multiple of ``bsz`` and cut it into ``bsz`` contiguous streams,
    one per column: returns ``(n_step, bsz)`` with column ``j`` = ``data[j*n_step:(j+1)*n_step]``."""
    if bsz < 1:
        raise ValueError(f"batch size must be >= 1, got {bsz}")
    n_step = data.size(0) // bsz
    if n_step < 2:
        raise DatasetError(f"{data.size(0)} tokens are too few for batch size {bsz} (need 2 per stream)")
    return data[: n_step * bsz].view(bsz, n_step).t().contiguous()


def shard_streams(batched: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s streams of a ``(n_step, B)`` global layout: columns ``[rank*B/W, (rank+1)*B/W)``.

    Every rank walks the same time steps, so segment ``k`` of rank ``r`` is columns ``r*B/W ...`` of the
    single-process segment ``k``: concatenating the ranks' batches along dim 1 (in rank order) gives the
    single-process batch exactly, and each rank's recurrent memory stays with its own streams. ``B`` must be
    divisible by ``W``.
    """
    n_step, bsz = batched.shape
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    if bsz % world:
        raise ValueError(f"global batch size {bsz} is not divisible by the world size {world}")
    per = bsz // world
    return batched[:, rank * per:(rank + 1) * per].contiguous()


class LMOrderedIterator:
    """Segments of ``tgt_len`` time steps over ``bsz`` parallel streams, in order, like the original.

    Iterating yields ``(data, target, seq_len)``: for the segment starting at row ``i``, ``seq_len =
    min(tgt_len, n_step - 1 - i)``, ``data = rows[max(0, i - ext_len) : i + seq_len]`` (``ext_len`` extra
    context rows before the segment), ``target = rows[i + 1 : i + 1 + seq_len]``; tensors are
    ``(len, local_bsz)``. Iteration does not depend on ``mem_len``: recurrent memory is the caller's.

    Epochs: every ``iter()`` is one epoch from row 0 -- reset the memory when a new ``for`` loop starts
    (segment index 0; :meth:`iter_from` resumes mid-epoch at a segment index). ``len()`` is the number of
    segments one epoch yields (the original's ``n_batch`` can be one more, when ``(n_step - 1) % tgt_len
    == 0``). With ``world_size > 1`` this rank takes :func:`shard_streams` of the global ``bsz`` layout.
    """

    def __init__(self, data: torch.Tensor, bsz: int, tgt_len: int, ext_len: int = 0,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1):
        if tgt_len < 1 or ext_len < 0:
            raise ValueError(f"need tgt_len >= 1 and ext_len >= 0, got {tgt_len}, {ext_len}")
        self.bsz, self.tgt_len, self.ext_len = bsz, tgt_len, ext_len
        self.rank, self.world_size = rank, world_size
        self.data = shard_streams(batchify(data, bsz), rank, world_size).to(device)
        self.n_step = self.data.size(0)

    @property
    def local_bsz(self) -> int:
        return self.data.size(1)

    def __len__(self) -> int:
        return len(range(0, self.n_step - 1, self.tgt_len))

    def get_batch(self, i: int, tgt_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The segment starting at row ``i`` (the original's ``get_batch``)."""
        seq_len = min(tgt_len or self.tgt_len, self.n_step - 1 - i)
        data = self.data[max(0, i - self.ext_len): i + seq_len]
        target = self.data[i + 1: i + 1 + seq_len]
        return data, target, seq_len

    def iter_from(self, segment: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """One epoch's segments from segment index ``segment`` on."""
        for i in range(segment * self.tgt_len, self.n_step - 1, self.tgt_len):
            yield self.get_batch(i)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        return self.iter_from(0)


def unigram_perplexity(train: torch.Tensor, split: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of ``split`` under train-set unigram counts with add-one (Laplace) smoothing.

    ``p(w) = (count_train(w) + 1) / (len(train) + vocab_size)``; every token of ``split`` counts, ``<eos>``
    included (as in the LM's own perplexity). The baseline a language model must beat.
    """
    if split.numel() == 0:
        raise ValueError("empty split")
    counts = torch.bincount(train.long(), minlength=vocab_size).double()
    if counts.numel() > vocab_size:
        raise ValueError(f"train has token ids >= vocab_size {vocab_size}")
    logp = torch.log((counts + 1.0) / (train.numel() + vocab_size))
    return math.exp(-logp[split.long()].mean().item())
