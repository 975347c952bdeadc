"""Jane Austen's six novels from Project Gutenberg's plain-text ebooks: where Debian's ``r-cran-janeaustenr``
cannot be fetched (no apt-get, or it fails), the Austen corpus builder downloads the same novels from here.

Each ebook is ``BASE_URL/<n>/pg<n>.txt`` (UTF-8, possibly with a byte-order mark, CRLF line ends). Only the text
between Gutenberg's ``*** START OF THE PROJECT GUTENBERG EBOOK ... ***`` and ``*** END OF ...`` lines is kept (the
licence header and footer are not the novel's), minus a table of contents (chapter headings with no prose between
them) and ``[Illustration]`` markers; :func:`austen.novel_to_lines` then drops the front matter
before the first chapter heading, as for the janeaustenr data. Gutenberg's editions differ from janeaustenr's
in small details (e.g. their title pages and some punctuation), so the two sources give slightly different corpora;
``stats.json`` records which one was used.
"""
from __future__ import annotations

import re
import urllib.request
from typing import Callable

from deqlab.errors import DatasetError

__all__ = ["EBOOKS", "BASE_URL", "ebook_url", "strip_gutenberg", "download_novels"]

# Project Gutenberg ebook numbers, keyed as the janeaustenr data names the novels
EBOOKS = {"emma": 158, "prideprejudice": 1342, "sensesensibility": 161, "persuasion": 105,
          "northangerabbey": 121, "mansfieldpark": 141}
BASE_URL = "https://www.gutenberg.org/cache/epub"
TIMEOUT_S = 60

_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG E-?BOOK", re.I)
_END = re.compile(r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG E-?BOOK|End of (the )?Project Gutenberg)", re.I)
_CHAPTER = re.compile(r"^(CHAPTER|Chapter)\s+([IVXLC]+|\d+)\.?$")
_VOLUME = re.compile(r"^(VOLUME|Volume)\s+([IVXLC]+|\d+)\.?$")
_ILLUSTRATION = re.compile(r"^\[Illustration[^\]]*\]$")

Opener = Callable[..., object]  # urllib.request.urlopen's signature: (url, timeout=...) -> a response to read()


def ebook_url(number: int, base_url: str = BASE_URL) -> str:
    return f"{base_url.rstrip('/')}/{number}/pg{number}.txt"


def _drop_contents(lines: list[str]) -> list[str]:
    """From the first chapter heading that prose follows (and the volume heading just above it, if any): a table
    of contents is headings with no prose between them."""
    heads = [i for i, line in enumerate(lines) if _CHAPTER.match(line.strip())]
    for n, i in enumerate(heads):
        stop = heads[n + 1] if n + 1 < len(heads) else len(lines)
        if any(len(line.split()) >= 8 for line in lines[i + 1:stop]):
            above = [j for j in range(i) if lines[j].strip()]
            return lines[above[-1]:] if above and _VOLUME.match(lines[above[-1]].strip()) else lines[i:]
    return lines


def strip_gutenberg(text: str, source: str) -> list[str]:
    """The novel's lines of one Gutenberg plain-text ebook (``source`` names it in errors)."""
    lines = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n").split("\n")
    start = next((i for i, line in enumerate(lines) if _START.match(line.strip())), None)
    end = next((i for i, line in enumerate(lines) if _END.match(line.strip())), None)
    if start is None or end is None or end <= start:
        raise DatasetError(f"{source} is not a Project Gutenberg plain-text ebook: no '*** START OF THE PROJECT "
                           f"GUTENBERG EBOOK' line followed by an '*** END OF ...' line")
    body = [line for line in lines[start + 1:end] if not _ILLUSTRATION.match(line.strip())]
    return _drop_contents(body)


def download_novels(base_url: str = BASE_URL, opener: Opener = urllib.request.urlopen,
                    log: Callable[[str], None] = print) -> dict[str, list[str]]:
    """The six novels' lines, downloaded from ``base_url`` (any URL urllib opens, ``file://`` included) with
    ``opener``. A failed download is one DatasetError line naming the URL."""
    novels = {}
    for name, number in EBOOKS.items():
        url = ebook_url(number, base_url)
        log(f"downloading {url}")
        try:
            with opener(url, timeout=TIMEOUT_S) as response:
                text = response.read().decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise DatasetError(f"{url} is not UTF-8 text ({err})") from None
        except (OSError, ValueError) as err:  # URLError/HTTPError are OSErrors; a bad URL is a ValueError
            reason = getattr(err, "reason", None) or err
            raise DatasetError(f"cannot download {url} ({reason})") from None
        novels[name] = strip_gutenberg(text, url)
    return novels
