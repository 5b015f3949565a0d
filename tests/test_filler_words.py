"""Filler-word caption augmentation: it only adds words, never between a number and its unit, never a word the
corpus' templates use, and a trainer's batches carry the edited captions."""
import re

import numpy as np
import pytest

from models.data.corpus import SyntheticCorpus
from models.text.encoders import NUMBER, number_spans
from models.training.filler_words import UNIT_WORDS, FillerWords, template_words, vocabulary_words

FILLERS = ["zebra", "quietly", "marble"]


def _without_fillers(caption: str) -> str:
    return " ".join(w for w in caption.split(" ") if w not in FILLERS)


def test_fillers_are_only_added_and_keep_numbers_with_their_units():
    corpus = SyntheticCorpus("train", seed=3)
    fill = FillerWords(FILLERS, prob=1.0, max_words=3)
    rng = np.random.default_rng(0)
    inserted = []
    for i in range(200):
        caption = corpus[i].caption
        noisy = fill(caption, rng)
        assert _without_fillers(noisy) == caption, "the original words stay, in order"
        words = noisy.split(" ")
        inserted.append(len(words) - len(caption.split(" ")))
        for j, w in enumerate(words):
            if NUMBER.search(w):
                assert not set(words[j + 1: j + 1 + UNIT_WORDS]) & set(FILLERS), noisy
        assert [v for _, _, v in number_spans(noisy)[1]] == [v for _, _, v in number_spans(caption)[1]]
    assert set(inserted) == {1, 2, 3}


def test_share_and_determinism():
    fill = FillerWords(FILLERS, prob=0.5)
    captions = [fill("a 440 Hz sine tone on the left", np.random.default_rng(s)) for s in range(200)]
    changed = sum(c != "a 440 Hz sine tone on the left" for c in captions)
    assert 60 < changed < 140
    assert captions == [fill("a 440 Hz sine tone on the left", np.random.default_rng(s)) for s in range(200)]
    assert FillerWords(FILLERS, prob=0.0)("a tone", np.random.default_rng(0)) == "a tone"
    assert fill("", np.random.default_rng(0)) == "", "a dropped (empty) condition stays empty"
    with pytest.raises(ValueError):
        FillerWords(FILLERS, prob=1.5)
    with pytest.raises(ValueError):
        FillerWords([], prob=0.5)


def test_the_vocabulary_leaves_out_every_template_word(tmp_path):
    words = template_words()
    assert {"left", "right", "sine", "louder", "rain", "pitched", "hz", "bpm"} <= words
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[CLS]", "##ing", "left", "zebra", "a1", "it", "marble", "sine",
                                "supercalifragilistic"]))
    assert vocabulary_words(vocab, words) == ["zebra", "marble"]
    shipped = FillerWords.for_text_encoder(0.5)
    assert len(shipped.words) > 10000 and not set(shipped.words) & words
    assert all(re.fullmatch(r"[a-z]+", w) for w in shipped.words)


def test_batches_carry_the_edited_captions(text_encoder):
    import torch

    from models.training.batches import sample_captioned_batch
    from models.training.latent_cache import LatentCache

    corpus = SyntheticCorpus("train", seed=0)
    params = [corpus.sample_params(corpus.rng_for(i)) for i in range(4)]
    cache = LatentCache([torch.zeros(3, 8) for _ in params], params, [1.0] * 4)
    fill = FillerWords(FILLERS, prob=1.0)
    batch = sample_captioned_batch(cache, corpus, text_encoder, np.random.default_rng(0), 6, caption_augment=fill)
    assert all(set(p.split(" ")) & set(FILLERS) for p in batch.prompts)
    assert batch.text.tokens.shape[0] == 6
