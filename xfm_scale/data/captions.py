"""Caption cleaning as X-FM's data pipeline does it (``pre_caption`` in the reference's
dataset/utils.py, zhangxinsong-nlp/XFM), for pair captions when ``data.caption_cleaning`` is on.

Steps, in this order (each matters for the exact result):

1. lower-case;
2. each of ``, . ' ! ? " ( ) * # : ;`` and ``~`` becomes a space, then ``-`` and ``/`` do too,
   then ``<person>`` becomes ``person``;
3. every run of two or more whitespace characters becomes one space (a single tab or newline
   between words is kept as it is);
4. trailing newlines, then leading and trailing spaces, are removed;
5. the caption is cut to its first ``max_words`` space-separated words (30 for captions).

A caption with nothing left is an error (:class:`EmptyCaption`); the loader counts it as an
``empty_caption`` bad sample and replaces it, as the reference skips it.
Written from the published description of the function, not copied.
"""
from __future__ import annotations

import re

CAPTION_MAX_WORDS = 30
"""Words kept per caption (X-FM's ``max_words`` for image-text pairs)."""

_PUNCTUATION = re.compile(r"[,.'!?\"()*#:;~]")
_WHITESPACE_RUN = re.compile(r"\s{2,}")


class EmptyCaption(ValueError):
    """The caption has no words left after cleaning."""


def pre_caption(caption: str, max_words: int = CAPTION_MAX_WORDS) -> str:
    """``caption`` cleaned as X-FM cleans pair captions (the module docstring lists the steps)."""
    text = _PUNCTUATION.sub(" ", caption.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = _WHITESPACE_RUN.sub(" ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    if not text:
        raise EmptyCaption(f"caption {caption[:80]!r} has no words left after cleaning")
    return text
