"""Builders of the text corpora the tools write (``make_austen_corpus.py``); not part of the ``deqlab`` package,
which only reads corpora (``deqlab.data.lm``)."""
