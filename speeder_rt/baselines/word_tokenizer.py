"""A word-level tokenizer for random-init backbones, which come without one.

Text splits into pieces: a newline, a run of letters, a single digit (so a catalog of numbered titles
needs ten digit tokens, not one per number) or a single punctuation mark, each optionally preceded by
one space, and any other single whitespace character. Concatenating the pieces gives the text back, so
``decode(encode(s)) == s`` for every ``s`` whose pieces are all in the vocabulary. The vocabulary is the
special tokens followed by the sorted distinct pieces of the texts it is built from: deterministic.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

_PIECE = re.compile(r"\n| ?[^\W\d]+| ?\d| ?[^\w\s]|\s")
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>", "\n")


def split_pieces(text: str) -> list[str]:
    """The pieces of ``text``; their concatenation is ``text``."""
    return _PIECE.findall(text)


class WordTokenizer:
    """Ids 0..4 are pad, unk, bos, eos and the newline; the text pieces follow in sorted order."""

    pad_id, unk_id, bos_id, eos_id, newline_id = range(len(SPECIALS))

    def __init__(self, texts: Iterable[str], vocab_size: int | None = None) -> None:
        """Build the vocabulary from ``texts``; a ``ValueError`` if it exceeds ``vocab_size`` (the backbone's)."""
        pieces = sorted({p for t in texts for p in split_pieces(t)} - set(SPECIALS))
        self.pieces: list[str] = list(SPECIALS) + pieces
        if vocab_size is not None and len(self.pieces) > vocab_size:
            raise ValueError(
                f"WordTokenizer: the titles and template need {len(self.pieces)} tokens but the backbone's "
                f"vocab_size is {vocab_size}; use a backbone with vocab_size >= {len(self.pieces)}"
            )
        self._ids = {p: i for i, p in enumerate(self.pieces)}

    def __len__(self) -> int:
        return len(self.pieces)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; pieces outside the vocabulary become ``unk_id``."""
        return [self._ids.get(p, self.unk_id) for p in split_pieces(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; pad, bos, eos and ids outside the vocabulary decode to nothing, unk to "<unk>"."""
        n, out = len(self.pieces), []
        for i in ids:
            i = int(i)
            if i == self.unk_id:
                out.append("<unk>")
            elif self.newline_id <= i < n:
                out.append(self.pieces[i])
        return "".join(out)
