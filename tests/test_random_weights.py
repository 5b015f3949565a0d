"""``models.random_weights``: an embedded model's architecture with random weights, built from configs and the text
encoder's tokenizer alone (what the GPU suite's machine gets: no weights travel there)."""
from __future__ import annotations

import shutil

import torch
from conftest import float32_default

from models.bundle import ModelBundle
from models.random_weights import random_model_copy, random_text_encoder_copy
from models.registry import ZOO
from models.text.encoders import minilm_path


def configs_only(tmp_path):
    """models/zoo/tta-arc and the codec it names, without a single weight file; and all-MiniLM-L6-v2 likewise."""
    for name in ("tta-arc", "tta-codec"):
        shutil.copytree(ZOO / name, tmp_path / "zoo" / name, ignore=shutil.ignore_patterns("*.safetensors", "onnx"))
    shutil.copytree(minilm_path(), tmp_path / "minilm", ignore=shutil.ignore_patterns("*.safetensors"))
    return tmp_path / "zoo" / "tta-arc", tmp_path / "minilm"


def test_a_random_copy_needs_no_weights_and_has_the_architecture_of_the_shipped_model(tmp_path, monkeypatch):
    model, tokenizer = configs_only(tmp_path)
    with float32_default():
        shipped = ModelBundle.load(ZOO / "tta-arc")
        monkeypatch.setattr("models.text.encoders.minilm_path", lambda: tokenizer)  # weights unreachable from here
        random = ModelBundle.load(random_model_copy(model, tmp_path / "random"))
    for part in ("denoiser", "codec"):
        mine, theirs = (dict(getattr(b, part).state_dict()) for b in (random, shipped))
        assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}, part
        assert not all(torch.equal(mine[k], theirs[k]) for k in theirs if theirs[k].is_floating_point()), part
    prompts = ["a 440 Hz tone", "rain"]
    mine, theirs = (b.text_encoder.encode(prompts) for b in (random, shipped))
    assert mine.tokens.shape == theirs.tokens.shape and torch.equal(mine.mask, theirs.mask)  # same tokenizer
    assert not torch.allclose(mine.tokens, theirs.tokens)
    with float32_default():
        (wave,) = random.pipeline.generate(["a 440 Hz tone"], [0.5], [1], steps=2)
    assert wave.shape == (2, 22050) and torch.isfinite(wave).all()


def test_the_random_text_encoder_is_the_same_every_time(tmp_path):
    with float32_default():
        a, b = (random_text_encoder_copy({"name": "minilm"}, tmp_path / name)["path"] for name in ("a", "b"))
    assert (tmp_path / "a" / "tokenizer.json").is_file()
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a == str(tmp_path / "a")
