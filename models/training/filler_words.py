"""Caption augmentation for denoiser training: random filler words inserted into a caption.

Why: the embedded teacher reads a stated number (a pitch in Hz, a tempo) through cross-attention over the caption's
token states, and what it takes from them moves with the words around the number. Trained on a few dozen
templates, the tenth-round teacher read the same pitch differently under each unseen phrasing: a per-caption bias
of 2.2 % (median) without guidance and 5 % with it, on held-out templates (``benchmarks/results/
teacher_session20.md``). Words that say nothing about the sound, put anywhere but between a number and its unit,
make a reading that leans on the exact words of a template a worse fit, in the spirit of the random insertion of
Wei and Zou's EDA (2019).

The words come from the text encoder's own vocabulary (whole words of letters only), less every word any caption
template of the corpus uses, so an inserted word never states a placement, an envelope or a source the clip lacks.

Measured (session 21, ``benchmarks/results/teacher_session21.md``): 2400 steps from the tenth round with fillers in
half the captions narrow the spread of the reading over held-out phrasings (sd 0.053 -> 0.045 in ln f) but do not
improve generated pitch (32 held-out tones: 4.5 % against 4.6 %); no shipped model uses it.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from models.data.corpus import TEMPLATES
from models.text.encoders import NUMBER, minilm_path

WORD = re.compile(r"^[a-z]{3,12}$")
# words captions state outside the templates (a pitch's unit, "middle C"), left out of the fillers as well
STATED_WORDS = frozenset({"hz", "hertz", "khz", "middle"})
# an inserted word keeps this many words after a number clear, so "120 beats per minute" stays whole
UNIT_WORDS = 3


def template_words(templates=TEMPLATES) -> set[str]:
    """Every lower-case word in the corpus' caption templates (all splits), placeholders left out, and the
    ``STATED_WORDS`` that fill them."""
    words: set[str] = set(STATED_WORDS)

    def walk(node) -> None:
        if isinstance(node, str):
            words.update(re.findall(r"[a-z]+", re.sub(r"\{[^}]*\}", " ", node.lower())))
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(templates)
    return words


def vocabulary_words(vocab_file: str | Path, exclude: Iterable[str] = ()) -> list[str]:
    """The whole words of letters (3 to 12) in a WordPiece ``vocab.txt``, less ``exclude``, in file order."""
    skip = set(exclude)
    lines = Path(vocab_file).read_text(encoding="utf-8").splitlines()
    return [w for w in lines if WORD.match(w) and w not in skip]


class FillerWords:
    """Inserts 1 .. ``max_words`` words drawn from ``words`` into a share ``prob`` of the captions it is given, each at
    a random gap between words (either end included) that is not within ``UNIT_WORDS`` words after a number."""

    def __init__(self, words: Sequence[str], prob: float, max_words: int = 3):
        if not 0.0 <= prob <= 1.0:
            raise ValueError("prob must be in [0, 1]")
        if max_words < 1:
            raise ValueError("max_words must be >= 1")
        if prob > 0 and not words:
            raise ValueError("no filler words to insert")
        self.words, self.prob, self.max_words = list(words), float(prob), int(max_words)

    @classmethod
    def for_text_encoder(cls, prob: float, max_words: int = 3) -> "FillerWords":
        """Filler words from the embedded text encoder's vocabulary, less the corpus' template words."""
        return cls(vocabulary_words(minilm_path() / "vocab.txt", template_words()), prob, max_words)

    def __call__(self, caption: str, rng: np.random.Generator) -> str:
        if not caption or self.prob == 0 or rng.random() >= self.prob:
            return caption
        words = caption.split(" ")
        for _ in range(int(rng.integers(1, self.max_words + 1))):
            gaps = [i for i in range(len(words) + 1)
                    if not any(NUMBER.search(w) for w in words[max(0, i - UNIT_WORDS): i])]
            if not gaps:
                break
            i = gaps[int(rng.integers(len(gaps)))]
            words.insert(i, self.words[int(rng.integers(len(self.words)))])
        return " ".join(words)
