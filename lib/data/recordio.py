"""MXNet recordIO (``.rec`` + ``.idx``), the packed image format DALI's ``readers.mxnet`` reads; no mxnet needed.

The layout is the one MXNet's ``im2rec`` writes:

- ``PREFIX.rec``: records back to back. Each is ``<II`` (magic ``0xced7230a``, length) followed by the
  payload, zero-padded to a multiple of 4 bytes. The length's top 3 bits are a continuation flag, 0 for a
  record written in one piece (the only kind written here; split records are refused on read).
- The payload of an image record is the ``IfQQ`` header (flag 0, float label, int id, 0) and the encoded image.
- ``PREFIX.idx``: one ``key<TAB>byte offset`` line per record.
- ``PREFIX.lst`` (im2rec's list, kept for reference): ``key<TAB>label<TAB>relative path`` lines.
"""
from __future__ import annotations

import os
import struct
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

from torch.utils.data import Dataset

from deqlab.data.images import decode_image
from deqlab.errors import DatasetError
from deqlab.utils.files import atomic_open

MAGIC = 0xCED7230A
RECORD_HEAD = struct.Struct("<II")
IMAGE_HEADER = struct.Struct("IfQQ")  # flag, label, id, id2 (native layout, as MXNet packs it)
LENGTH_MASK = (1 << 29) - 1
REBUILD = "rebuild the file with tools/make_recordio.py"


def pack_image_record(label: float, key: int, image_bytes: bytes) -> bytes:
    """One ``.rec`` record holding an encoded image and its label."""
    payload = IMAGE_HEADER.pack(0, float(label), int(key), 0) + image_bytes
    if len(payload) > LENGTH_MASK:
        raise ValueError(f"record {key} is {len(payload)} bytes; recordIO records are limited to {LENGTH_MASK}")
    return RECORD_HEAD.pack(MAGIC, len(payload)) + payload + b"\0" * (-len(payload) % 4)


class RecordIOWriter:
    """Write ``PREFIX.rec``/``.idx``/``.lst`` atomically: each goes to a temporary file renamed on success
    (the ``.idx`` last, so a crash never leaves an index pointing into a missing or shorter ``.rec``)."""

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = Path(prefix)
        self._stack = ExitStack()
        self.offset, self.count = 0, 0

    def __enter__(self) -> "RecordIOWriter":
        # ExitStack closes in reverse order: .lst, then .idx, then .rec get renamed. Opened in the order idx,
        # rec, lst, they are renamed lst, rec, idx: the index appears only once the .rec it points into is there.
        self._idx = self._stack.enter_context(atomic_open(f"{self.prefix}.idx", "w"))
        self._rec = self._stack.enter_context(atomic_open(f"{self.prefix}.rec", "wb"))
        self._lst = self._stack.enter_context(atomic_open(f"{self.prefix}.lst", "w"))
        return self

    def __exit__(self, *exc) -> bool | None:
        return self._stack.__exit__(*exc)

    def write(self, label: int, image_bytes: bytes, path: str = "") -> None:
        record = pack_image_record(label, self.count, image_bytes)
        self._rec.write(record)
        self._idx.write(f"{self.count}\t{self.offset}\n")
        self._lst.write(f"{self.count}\t{float(label)}\t{path}\n")
        self.offset += len(record)
        self.count += 1


class RecordFiles(NamedTuple):
    rec: Path
    idx: Path
    offsets: list[int]
    size: int  # of the .rec file, in bytes

    def record(self, i: int) -> str:
        """How an error names record ``i``."""
        return f"{self.rec} record {i} (byte {self.offsets[i]})"


def record_problem(fh, offset: int, size: int) -> str | None:
    """What is wrong with the record at ``offset`` of the open ``.rec`` file ``fh`` of ``size`` bytes: None for a
    single-piece record that fits in the file."""
    fh.seek(offset)
    head = fh.read(RECORD_HEAD.size)
    if len(head) < RECORD_HEAD.size:
        return f"no record there: the file has {size} bytes (truncated?)"
    magic, length = RECORD_HEAD.unpack(head)
    if magic != MAGIC:
        return f"bad magic number 0x{magic:08x} (a record starts with 0x{MAGIC:08x}; damaged, or another index?)"
    if length >> 29:
        return "a record split in pieces (continuation flag set); only single-piece records are read"
    end = offset + RECORD_HEAD.size + (length & LENGTH_MASK)
    if end > size:
        return f"truncated: the record ends at byte {end}, the file has {size}"
    return None


def open_recordio(rec: str | os.PathLike) -> RecordFiles:
    """Check ``rec`` and its ``.idx`` beside it before anything reads them; a one-line DatasetError says what is
    wrong (missing index, empty, an offset outside the file, a last record that runs past its end: truncated).
    The records in between are checked as they are read (a full scan would read every record of a large file)."""
    rec = Path(rec)
    idx = rec.with_suffix(".idx")
    if not rec.is_file():
        raise DatasetError(f"recordIO file {rec} not found")
    if not idx.is_file():
        raise DatasetError(f"recordIO file {rec} has no index {idx}; rebuild both with tools/make_recordio.py "
                           f"(or MXNet's im2rec)")
    offsets = []
    with idx.open() as fh:
        for line_no, line in enumerate(fh, 1):
            parts = line.split()
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                raise DatasetError(f"{idx} line {line_no}: expected 'key<TAB>offset', got {line.strip()!r}")
            offsets.append(int(parts[1]))
    if not offsets:
        raise DatasetError(f"recordIO index {idx} lists no records")
    files = RecordFiles(rec, idx, offsets, rec.stat().st_size)
    last = max(range(len(offsets)), key=offsets.__getitem__)
    with rec.open("rb") as fh:
        problem = record_problem(fh, offsets[last], files.size)
    if problem:
        raise DatasetError(f"recordIO file {rec} does not fit its index {idx}: {files.record(last)}: {problem}; "
                           f"copy or rebuild both")
    return files


def first_bad_record(files: RecordFiles) -> str | None:
    """``"<record>: <problem>"`` for the first record of ``files`` that cannot be read, None when all can.
    Reads every record header: for naming the record after a reader failed."""
    with files.rec.open("rb") as fh:
        for i, offset in enumerate(files.offsets):
            problem = record_problem(fh, offset, files.size)
            if problem:
                return f"{files.record(i)}: {problem}"
    return None


def read_image_record(fh, files: RecordFiles, i: int) -> tuple[float, bytes]:
    """``(label, encoded image bytes)`` of record ``i`` of ``files``, read from its open ``.rec`` file ``fh``."""
    problem = record_problem(fh, files.offsets[i], files.size)
    if problem:
        raise DatasetError(f"{files.record(i)}: {problem}; {REBUILD}")
    fh.seek(files.offsets[i])
    _, length = RECORD_HEAD.unpack(fh.read(RECORD_HEAD.size))
    payload = fh.read(length & LENGTH_MASK)
    if len(payload) < IMAGE_HEADER.size:
        raise DatasetError(f"{files.record(i)}: {len(payload)} bytes, too short for an image record's header")
    flag, label, _, _ = IMAGE_HEADER.unpack_from(payload)
    if flag != 0:  # flag > 0: `flag` float labels follow the header (multi-label records)
        raise DatasetError(f"{files.record(i)}: {flag} labels; one label per image expected")
    return label, payload[IMAGE_HEADER.size:]


def record_images(files: RecordFiles, order: Iterable[int]) -> Iterator[tuple[str, bytes]]:
    """``(record name, encoded image)`` of the records ``order`` lists, read lazily."""
    with files.rec.open("rb") as fh:
        for i in order:
            yield files.record(i), read_image_record(fh, files, i)[1]


class RecordIODataset(Dataset):
    """The images of a ``.rec`` file (in ``.idx`` order) as ``(transform(PIL RGB image), int label)``, the
    torchvision-loader twin of DALI's ``readers.mxnet``."""

    def __init__(self, rec: str | os.PathLike, transform: Callable | None = None) -> None:
        self.files = open_recordio(rec)
        self.transform = transform
        self._fh = None  # opened lazily, once per DataLoader worker
        self._pid = None

    def __len__(self) -> int:
        return len(self.files.offsets)

    def __getitem__(self, i: int):
        if self._fh is None or self._pid != os.getpid():
            self._fh, self._pid = self.files.rec.open("rb"), os.getpid()
        label, data = read_image_record(self._fh, self.files, i)
        image = decode_image(data, self.files.record(i), "RGB", hint=REBUILD)
        return (self.transform(image) if self.transform else image), int(label)

    def __getstate__(self) -> dict:  # open file handles do not cross into worker processes
        return {**self.__dict__, "_fh": None, "_pid": None}
