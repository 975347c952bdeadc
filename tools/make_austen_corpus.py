"""Build the Jane Austen word-level corpus in the WikiText layout: ``python tools/make_austen_corpus.py``.

Reads Debian's ``r-cran-janeaustenr`` (downloaded with ``apt-get download`` into a temporary folder, or
``--deb PATH``, or an extracted ``--rdata-dir .../janeaustenr/data``); where apt-get is missing or fails (or with
``--gutenberg``) it downloads the same six novels from Project Gutenberg instead (``--gutenberg-url``: another
mirror or a local ``file://`` folder of ``<n>/pg<n>.txt``), and where neither can be reached it says so in one
line. Writes ``data/austen/{train,valid,test}.txt`` plus ``stats.json`` and ``README.md``; train = Emma,
Mansfield Park, Pride and Prejudice, Sense and Sensibility, valid = Northanger Abbey, test = Persuasion. Format:
``tools/corpora/austen.py``. Reading the Debian package needs PyPI ``rdata``.

Example::

    python tools/make_austen_corpus.py --out data/austen
"""
import argparse
from pathlib import Path

from corpora import gutenberg  # tools/corpora: this script's folder is on sys.path
from corpora.austen import build_corpus, load_novels
from deqlab.engine.cli import run_tool
from deqlab.utils.tool_help import help_format

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(**help_format(__doc__))
    parser.add_argument("--out", default=str(REPO / "data" / "austen"), help="output folder (default: data/austen)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--deb", help="a downloaded r-cran-janeaustenr_*.deb (skips apt-get)")
    source.add_argument("--rdata-dir", help="an extracted .../janeaustenr/data folder holding Rdata.rdx/Rdata.rdb")
    source.add_argument("--gutenberg", action="store_true",
                        help="download from Project Gutenberg without trying apt-get first")
    parser.add_argument("--gutenberg-url", default=gutenberg.BASE_URL,
                        help=f"where Project Gutenberg's <n>/pg<n>.txt ebooks are (default {gutenberg.BASE_URL})")
    parser.add_argument("--min-count", type=int, default=3,
                        help="train words seen fewer times become <unk> everywhere (default 3)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing corpus in --out")
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[austen] {msg}", flush=True)

    out = Path(args.out)
    if (out / "train.txt").exists() and not args.force:  # fail before downloading anything
        build_corpus({}, out, args.min_count, force=False)
    novels, src = load_novels(args.deb, args.rdata_dir, log=log, use_gutenberg=args.gutenberg,
                              gutenberg_url=args.gutenberg_url)
    stats = build_corpus(novels, out, args.min_count, force=args.force, source=src, log=log)
    for split, s in stats["splits"].items():
        log(f"{split}: {s['tokens_with_eos']:,} tokens, <unk> {100 * s['unk_rate']:.2f}%, "
            f"unigram ppl {s['unigram_ppl']}")
    log(f"vocabulary {stats['vocab_size']:,} symbols; wrote {out}")
    return stats


if __name__ == "__main__":
    run_tool(main)
