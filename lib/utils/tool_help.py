"""What every tool's ``--help`` shares (kept free of torch, so a light tool's help stays instant)."""
from __future__ import annotations

import argparse

# scripts/_help.sh prints the same two lines after a script's header
CONFIG_KEYS_EPILOG = ("config keys: every KEY of the KEY VALUE overrides and of the --cfg YAMLs is listed, with the "
                      "values\nit accepts, in lib/config/defaults.py (installed as deqlab/config/defaults.py)")


def help_format(doc: str) -> dict:
    """``ArgumentParser`` keyword arguments for a tool: its whole module docstring as the description (the
    summary, the details and its example, line breaks kept) and the epilog saying where config keys are documented."""
    return {"description": doc.strip().replace("``", "`").replace("::\n", ":\n"), "epilog": CONFIG_KEYS_EPILOG,
            "formatter_class": argparse.RawDescriptionHelpFormatter}
