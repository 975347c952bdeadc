"""Decoding image files with PIL so that a damaged one is a one-line DatasetError naming it, not a traceback."""
from __future__ import annotations

import io
import itertools
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

from PIL import Image

from deqlab.errors import DatasetError

# What PIL raises for a damaged file: OSError (truncated data, "cannot identify image file"), and, from some
# plugins' parsers, SyntaxError, ValueError, EOFError or struct.error; DecompressionBombError for huge sizes.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


def decode_image(source: str | os.PathLike | bytes, name: str, mode: str | None = None,
                 draft: bool = False, hint: str = "replace or remove the file") -> Image.Image:
    """The fully decoded image in ``source`` (a path or the encoded bytes), converted to ``mode`` when given.

    ``name`` says which file or record it is in the error, ``hint`` what to do about it. ``draft``: decode a JPEG at the smallest DCT scale
    (every byte of the entropy-coded data is still read, so truncation is still found, several times faster;
    for checking files, not for using the pixels).
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            if draft:
                image.draft(image.mode, (1, 1))
            return image.convert(mode) if mode else image.copy()  # both decode every pixel
    except DECODE_ERRORS as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DatasetError(f"{name}: cannot decode the image ({reason}); {hint}") from None


def first_undecodable(images: Iterable[tuple[str, str | os.PathLike | bytes]], threads: int = 4,
                      hint: str = "replace or remove the file", chunk: int = 256) -> str | None:
    """The error message of the first of ``images`` (``(name, path or encoded bytes)`` pairs, read lazily in
    chunks) that cannot be decoded, None when all can: for naming the file after a decoder that does not name
    it failed. Each image is decoded in draft mode on ``threads`` threads (PIL releases the GIL)."""
    def failure(item: tuple[str, str | os.PathLike | bytes]) -> str | None:
        try:
            decode_image(item[1], item[0], draft=True, hint=hint)
        except DatasetError as err:
            return str(err)
        return None

    items = iter(images)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        while batch := list(itertools.islice(items, chunk)):
            found = next((msg for msg in pool.map(failure, batch) if msg), None)
            if found:
                return found
    return None
