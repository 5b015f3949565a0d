"""Latent pitch transposition: the shipped codec's shifted latents decode to the stated pitch, the transposer moves
only tones (and only their real frames), and it never states a held-out pitch."""
import numpy as np
import pytest
import torch

from models.registry import ZOO
from models.codec import load_codec
from models.data.corpus import (HELDOUT_PITCHES_HZ, PITCH_HOLDOUT_TOL, PITCH_RANGE_HZ, SyntheticCorpus,
                                render)
from models.training.augment import PitchTransposer, PlacementMover, compose
from models.training.latent_cache import LatentCache, sample_batch


@pytest.fixture(scope="module")
def codec():
    with torch.no_grad():
        return load_codec(ZOO / "tta-codec").float().eval()


def _clips(corpus, category, n, max_seconds=2.0):
    out = []
    i = 0
    while len(out) < n:
        p = corpus.sample_params(corpus.rng_for(i))
        if p["category"] == category and p["duration"] <= max_seconds:
            out.append(p)
        i += 1
    return out


def _cache_of(codec, params) -> LatentCache:
    latents = [codec.encode(torch.from_numpy(render(p))[None])[0] for p in params]
    return LatentCache(latents, params, [p["duration"] for p in params])


def _augmented_batch(codec, params, augment, seed, batch):
    """A batch drawn from these clips' latents, before and after ``augment``: (x0, mask, before, moved, after)."""
    cache = _cache_of(codec, params)
    rng = np.random.default_rng(seed)
    x0, mask, idx, _ = sample_batch(cache, rng, batch)
    before = [cache.params[i] for i in idx]
    moved, after = augment(x0, mask, before, rng)
    assert not (moved * ~mask[:, None, :]).any(), "padding stays zero"
    return x0, mask, before, moved, after


@pytest.mark.parametrize("ratio", [0.55, 1.3, 1.9])
def test_shifted_latents_decode_to_the_shifted_pitch(codec, ratio):
    from models.eval.pitch import PitchTracker

    corpus = SyntheticCorpus("train", seed=0)
    p = next(q for q in _clips(corpus, "tone", 10) if q["waveform"] in ("sawtooth", "square")
             and 150 <= q["pitch_hz"] <= 900 and q.get("envelope") is None)
    z = codec.encode(torch.from_numpy(render(p))[None])
    wave = codec.decode(codec.shift_pitch(z, ratio))[0].numpy()
    f0 = PitchTracker("tiny").median_pitch(wave, 44100)
    assert f0 == pytest.approx(p["pitch_hz"] * ratio, rel=0.01)
    # the other channels are untouched, and a ratio of 1 is the identity
    pitch = slice(1, codec.config.pitch_channels, 2)
    changed = (codec.shift_pitch(z, ratio) - z).abs().amax(dim=(0, 2)) > 1e-5
    assert changed[pitch].all() and not changed[codec.config.pitch_channels:].any()
    assert torch.allclose(codec.shift_pitch(z, 1.0), z, atol=1e-5)


def test_transposer_moves_tones_to_stated_pitches_and_leaves_the_rest(codec):
    corpus = SyntheticCorpus("train", seed=0)
    x0, mask, before, moved, after = _augmented_batch(
        codec, _clips(corpus, "tone", 3) + _clips(corpus, "noise", 2), PitchTransposer(codec, corpus, prob=1.0), 0, 12)
    rng = np.random.default_rng(1)
    pitch = slice(1, codec.config.pitch_channels, 2)
    for b, (p, q) in enumerate(zip(before, after)):
        if p["category"] != "tone":
            assert q is p and torch.equal(moved[b], x0[b])
            continue
        ratio = q["pitch_hz"] / p["pitch_hz"]
        assert 0.5 <= ratio <= 2.0 and q["pitch_text"].startswith(str(int(q["pitch_hz"])))
        assert {k: v for k, v in q.items() if not k.startswith("pitch")} == \
               {k: v for k, v in p.items() if not k.startswith("pitch")}
        expected = codec.shift_pitch(x0[b: b + 1], ratio)[0]
        assert torch.allclose(moved[b][:, mask[b]], expected[:, mask[b]], atol=1e-4)
        assert not torch.allclose(moved[b][pitch][:, mask[b]], x0[b][pitch][:, mask[b]])
        assert str(int(q["pitch_hz"])) in corpus.caption(q, rng)
    assert PitchTransposer(codec, corpus, prob=0.0)(x0, mask, before, rng)[0] is x0


def test_transposed_pitches_avoid_held_out_values():
    corpus = SyntheticCorpus("train", seed=0)
    tone = _clips(corpus, "tone", 1)[0]
    rng = np.random.default_rng(1)
    drawn = [corpus.transposed_params(tone, rng, 80.0, 2000.0)["pitch_hz"] for _ in range(2000)]
    assert all(PITCH_RANGE_HZ[0] <= f <= PITCH_RANGE_HZ[1] for f in drawn)
    assert all(abs(f - h) / h >= PITCH_HOLDOUT_TOL for f in drawn for h in HELDOUT_PITCHES_HZ)
    assert len(set(drawn)) > 500, "whole-Hz values spread over the range"
    # a range entirely near one held-out pitch has nothing to offer; a non-tone is refused
    h = HELDOUT_PITCHES_HZ[5]
    assert corpus.transposed_params(tone, rng, h * 0.995, h * 1.005) is None
    with pytest.raises(ValueError):
        corpus.transposed_params(_clips(corpus, "noise", 1)[0], rng, 100.0, 200.0)


def test_a_wider_transposition_range_flattens_the_pitch_prior(codec):
    """Widened, the transposer states pitches beyond the corpus' range (so the scored range lies inside a flat
    prior), still whole Hz and away from held-out values; a nonsense range is refused."""
    corpus = SyntheticCorpus("train", seed=0)
    tone = _clips(corpus, "tone", 1)[0]
    rng = np.random.default_rng(2)
    wide = (50.0, 3200.0)
    drawn = np.array([corpus.transposed_params(tone, rng, 1.0, 1e5, pitch_range=wide)["pitch_hz"]
                      for _ in range(3000)])
    assert drawn.min() >= wide[0] and drawn.max() <= wide[1]
    assert (drawn < PITCH_RANGE_HZ[0]).any() and (drawn > PITCH_RANGE_HZ[1]).any()
    assert all(abs(f - h) / h >= PITCH_HOLDOUT_TOL for f in drawn for h in HELDOUT_PITCHES_HZ)
    # log-uniform: each sixth of the log range holds about a sixth of the draws
    counts = np.histogram(np.log(drawn), bins=6, range=tuple(np.log(wide)))[0]
    assert counts.min() > 0.75 * len(drawn) / 6
    with pytest.raises(ValueError):
        PitchTransposer(codec, corpus, 0.5, pitch_range=(2000.0, 80.0))
    with pytest.raises(ValueError):
        PitchTransposer(codec, corpus, 0.5, max_octaves=0.0)


def test_placement_mover_repans_to_the_stated_placement(codec):
    from models.eval.adherence import placement_matches

    corpus = SyntheticCorpus("train", seed=0)
    sided = []
    i = 0
    while len(sided) < 3:
        p = corpus.sample_params(corpus.rng_for(i))
        i += 1
        if (p.get("placement") in ("left", "right") and p["category"] in ("tone", "noise", "clicks")
                and 1.5 <= p["duration"] <= 3.0 and p.get("envelope") is None):
            sided.append(p)
    unplaced = next(p for p in _clips(corpus, "noise", 20) if p.get("placement") is None)
    x0, mask, before, moved, after = _augmented_batch(
        codec, sided + [unplaced], PlacementMover(codec, corpus, prob=1.0), 3, 16)
    seen = set()
    for b, (p, q) in enumerate(zip(before, after)):
        if p.get("placement") is None:
            assert q is p and torch.equal(moved[b], x0[b])
            continue
        keep = ("placement", "pan_db", "pan_start_db", "pan_end_db")
        assert {k: v for k, v in q.items() if k not in keep} == {k: v for k, v in p.items() if k not in keep}
        changed = (moved[b] - x0[b]).abs().amax(dim=1) > 1e-5
        assert not changed[: codec.config.pitch_channels].any() and not changed[codec.config.pitch_channels + 1:].any()
        frames = int(mask[b].sum())
        wave = codec.decode(moved[b: b + 1, :, :frames])[0].numpy()
        assert placement_matches(wave, q["placement"]), (p["placement"], q["placement"])
        seen.add(q["placement"])
    assert len(seen) >= 3, seen


def test_compose_chains_augmentations_and_none_is_none(codec):

    assert compose(None, None) is None
    calls = []

    def tag(name):
        def apply(x0, mask, params, rng):
            calls.append(name)
            return x0 + 1, params + [name]
        return apply

    x0, params = compose(tag("a"), None, tag("b"))(torch.zeros(1), None, [], None)
    assert calls == ["a", "b"] and params == ["a", "b"] and x0.item() == 2


def test_captioned_batches_state_the_augmented_ground_truth(codec, text_encoder):
    from models.training.augment import latent_augment
    from models.training.batches import sample_captioned_batch

    corpus = SyntheticCorpus("train", seed=0)
    params = _clips(corpus, "tone", 4)
    cache = _cache_of(codec, params)
    augment = latent_augment(codec, corpus, pitch_shift=1.0)
    batch = sample_captioned_batch(cache, corpus, text_encoder, np.random.default_rng(0), 8, augment=augment)
    plain = sample_captioned_batch(cache, corpus, text_encoder, np.random.default_rng(0), 8)
    assert batch.idx == plain.idx and not torch.equal(batch.x0, plain.x0)
    stated = [p["pitch_text"].split("H")[0].split(" ")[0] for p in params]
    assert not any(s in prompt for prompt in batch.prompts for s in stated if s.isdigit())
    assert latent_augment(codec, corpus) is None
