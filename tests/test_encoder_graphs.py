"""The text encoder's GPU path (``models.text.encoder_graphs``): inputs padded to (rows, tokens) buckets give the
unpadded states up to float rounding, 16-bit weights stay close and come back as float32, and the wrapper goes in
once. On the CPU the padding runs without a graph; the capture runs in the GPU suite."""
from __future__ import annotations

import pytest
import torch
from conftest import cuda_only, float32_default

from models.text import HFTextEncoder, minilm_path
from models.text.encoder_graphs import GraphedEncoder, use_encoder_graphs

PROMPTS = ["a 440 Hz sine tone", "rain on a tin roof, then thunder far away and a dog barking twice", "clicks"]


@pytest.fixture()
def minilm():
    with float32_default():
        return HFTextEncoder(minilm_path())


def states(encoder) -> list[torch.Tensor]:
    return [t for t, _ in encoder.encode_unpadded(PROMPTS)]


def test_bucket_padding_keeps_each_prompts_states(minilm):
    plain = states(minilm)
    assert use_encoder_graphs(minilm)
    assert isinstance(minilm.model, GraphedEncoder)
    padded = states(minilm)  # 3 rows -> 4 (a copy of row 0), the longest prompt's tokens -> a multiple of 16
    for a, b in zip(plain, padded):
        assert a.shape == b.shape and b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_bfloat16_weights_stay_close_and_answer_in_float32(minilm):
    plain = states(minilm)
    use_encoder_graphs(minilm, torch.bfloat16, graphs=False)
    assert next(minilm.model.parameters()).dtype == torch.bfloat16
    for a, b in zip(plain, states(minilm)):
        assert b.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99


def test_the_wrapper_goes_in_once_and_only_where_there_is_a_model(minilm):
    assert use_encoder_graphs(minilm)
    wrapped = minilm.model
    assert not use_encoder_graphs(minilm)  # a shared encoder is set up once
    assert minilm.model is wrapped
    assert not use_encoder_graphs(object())


def test_a_checkpoints_t5_takes_it_unchanged(sao_tiny):
    from models.checkpoints import load_checkpoint_dir

    with float32_default():
        bundle = load_checkpoint_dir(sao_tiny)
    plain = bundle.text_encoder.encoder.encode_unpadded(PROMPTS)
    assert use_encoder_graphs(bundle.text_encoder)
    for (a, _), (b, _) in zip(plain, bundle.text_encoder.encoder.encode_unpadded(PROMPTS)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@cuda_only("CUDA graph capture needs a CUDA device (GPU suite)")
def test_a_captured_encoder_replays_its_eager_states(minilm_random):
    with float32_default():
        enc = HFTextEncoder(minilm_random, device="cuda")
    plain = states(enc)
    use_encoder_graphs(enc)
    for _ in range(2):
        for a, b in zip(plain, states(enc)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert enc.model.graphs.captures == 1
