"""Phrasing consistency: the canonical caption is one fixed wording of a clip's ground truth, and the consistency
term is zero exactly when a tone's caption predicts the pitch channels the reference predicts under that wording."""
import numpy as np
import pytest
import torch

from models.data.corpus import SyntheticCorpus, canonical_caption
from models.diffusion import VPCosineSchedule, VPrediction
from models.dit import DiT, DiTConfig
from models.layers import fill_zero_parameters
from models.training.batches import CaptionedBatch
from models.training.phrasing import consistency_rows, phrasing_consistency


def _tones(corpus, n):
    out, i = [], 0
    while len(out) < n:
        p = corpus.sample_params(corpus.rng_for(i))
        i += 1
        if p["category"] == "tone":
            out.append(p)
    return out


def test_canonical_caption_is_one_wording_of_the_ground_truth():
    train, held = SyntheticCorpus("train", seed=0), SyntheticCorpus("heldout", seed=0)
    for p in _tones(train, 20) + _tones(held, 20):
        captions = {SyntheticCorpus(split).caption(p, np.random.default_rng(s))
                    for split in ("train", "heldout") for s in range(4)}
        assert len(captions) > 1
        canon = canonical_caption(p)
        assert canon == canonical_caption(dict(p)), "deterministic"
        assert f"{int(round(p['pitch_hz']))} Hz" in canon
        if p.get("placement"):
            assert SyntheticCorpus("train").caption(p, np.random.default_rng(0)) != "" and "{" not in canon
    note = next(p for p in _tones(train, 200) if "Hz" not in p["pitch_text"] and "hertz" not in p["pitch_text"])
    assert note["pitch_text"] not in canonical_caption(note)


def _batch(text_encoder, prompts, params):
    n, frames = len(prompts), 6
    mask = torch.ones(n, frames, dtype=torch.bool)
    mask[0, 4:] = False
    return CaptionedBatch(torch.zeros(n, 5, frames), mask, list(range(n)), prompts, text_encoder.encode(prompts),
                          torch.full((n,), 2.0), params)


@pytest.fixture(scope="module")
def model(text_encoder):
    torch.manual_seed(0)
    dit = DiT(DiTConfig(latent_dim=5, width=32, depth=1, heads=2, text_dim=text_encoder.dim,
                        pooled_dim=text_encoder.pooled_dim)).eval()
    fill_zero_parameters(dit, 0.2)
    return dit


def test_consistency_is_zero_under_the_canonical_caption_itself(model, text_encoder):
    corpus = SyntheticCorpus("train", seed=0)
    tones = _tones(corpus, 3)
    noise = {"category": "noise", "colour": "white", "placement": None, "envelope": None}
    params = tones + [noise]
    param = VPrediction(VPCosineSchedule())
    z, t = torch.randn(4, 5, 6), torch.tensor([0.9, 0.5, 0.2, 0.7])

    def term(prompts):
        b = _batch(text_encoder, prompts, params)
        with torch.no_grad():
            out = model(z, t, b.text.tokens, b.text.mask, b.text.pooled, b.seconds, b.mask)
        return phrasing_consistency(out, z, t, b, model, text_encoder, param, channels=4), b

    same, b = term([canonical_caption(p) for p in tones] + ["white noise"])
    assert consistency_rows(b) == [0, 1, 2]
    assert float(same) < 1e-10
    other, b = term([corpus.caption(p, np.random.default_rng(1)) for p in tones] + ["white noise"])
    assert float(other) > 1e-6
    dropped, b = term(["", "", ""] + ["white noise"])
    assert consistency_rows(b) == [] and float(dropped) == 0.0


def test_consistency_needs_the_ground_truth(text_encoder):
    b = _batch(text_encoder, ["a tone"], None)
    with pytest.raises(ValueError, match="ground truth"):
        consistency_rows(b)
