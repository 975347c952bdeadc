"""Write the Cityscapes list files: ``python tools/make_cityscapes_lists.py --root data/cityscapes [--out DIR]``.

Reads an official Cityscapes tree (``leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png`` and
``gtFine/{train,val}/<city>/*_gtFine_labelIds.png``; nothing is downloaded) and writes ``{train,val,test}.lst``
for every split it has, by default into ``list/cityscapes/`` beside the Cityscapes folder (``data/list/cityscapes``
for ``data/cityscapes``), where ``DATASET.TRAIN_SET list/cityscapes/train.lst`` finds them
(``deqlab.data.cityscapes_lists``). Prints the image count of each list.

Example::

    python tools/make_cityscapes_lists.py --root data/cityscapes
"""
import argparse
from pathlib import Path

from deqlab.data.cityscapes_lists import write_lists
from deqlab.engine.cli import run_tool
from deqlab.utils.tool_help import help_format


def main() -> None:
    parser = argparse.ArgumentParser(**help_format(__doc__))
    parser.add_argument("--root", type=Path, required=True, help="the Cityscapes folder (leftImg8bit/, gtFine/)")
    parser.add_argument("--out", type=Path, default=None, help="folder of the lists (default ROOT/../list/cityscapes)")
    args = parser.parse_args()
    out = args.out or args.root.resolve().parent / "list" / "cityscapes"
    for split, count in write_lists(args.root, out).items():
        print(f"{out / (split + '.lst')}: {count} images")


if __name__ == "__main__":
    run_tool(main)
