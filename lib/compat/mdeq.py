"""locuslab/mdeq's tool flags (``tools/cls_train.py --modelDir DIR ...``), accepted by every deqlab tool."""
from __future__ import annotations

from deqlab.compat import Flag

FLAGS: dict[str, Flag] = {
    "--modelDir": Flag(("OUTPUT_DIR",), help="same as OUTPUT_DIR (locuslab/mdeq flag)"),
    "--logDir": Flag(("LOG_DIR",), help="same as LOG_DIR (locuslab/mdeq flag)"),
    "--dataDir": Flag(("DATA_DIR",), help="same as DATA_DIR (locuslab/mdeq flag)"),
    "--testModel": Flag(("TEST.MODEL_FILE",), help="same as TEST.MODEL_FILE (locuslab/mdeq flag)"),
    "--percent": Flag(("PERCENT",), help="same as PERCENT (locuslab/mdeq flag)"),
}
