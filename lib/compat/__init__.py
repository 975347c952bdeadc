"""Compatibility with the original codebases' files and flags (locuslab/mdeq, locuslab/deq, locuslab/torchdeq)."""
