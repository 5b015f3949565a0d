"""Text encoders load from local directories only: the shipped MiniLM and any T5 encoder directory."""
import math

import pytest
import torch

from models.text import HFTextEncoder, load_text_encoder, minilm_path


def make_local_t5(path):
    """A tiny randomly initialised T5 saved the way a downloaded checkpoint directory looks."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "sine", "tone", "on", "the", "left", "rain", "440", "hz"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(words), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    T5EncoderModel(cfg).save_pretrained(path)


def test_minilm_ships_with_its_package():
    assert (minilm_path() / "config.json").is_file()
    enc = load_text_encoder({"name": "minilm"})
    out = enc.encode(["a 440 Hz sine tone on the left", ""])
    assert out.tokens.shape[-1] == enc.dim == 384
    assert out.mask[1].sum() == 2  # the empty prompt still has [CLS] [SEP]
    assert torch.allclose(out.pooled.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_t5_encoder_from_a_local_directory(tmp_path):
    make_local_t5(tmp_path / "t5")
    enc = load_text_encoder({"name": "t5", "path": str(tmp_path / "t5"), "max_length": 8})
    assert enc.encoder.kind == "t5" and enc.dim == 16
    out = enc.encode(["a sine tone on the left", "rain"])
    assert out.tokens.shape[:2] == (2, 6) and out.mask.sum(1).tolist() == [6, 1]
    assert torch.isfinite(out.tokens).all()


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFTextEncoder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="needs a local 'path'"):
        load_text_encoder({"name": "t5"})


def test_number_channels_code_the_value_on_its_own_tokens():
    enc = load_text_encoder({"name": "minilm", "number_freqs": 16})
    assert enc.dim == 384 + 32 and enc.pooled_dim == 384 + 32
    text = enc.encode(["a 508 Hz square tone", "a 523 Hz square tone", "rain on a roof"])
    numbers = text.tokens[..., 384:]
    tokens = enc.encoder.tokenizer.convert_ids_to_tokens(enc.encoder.tokenizer("a 508 Hz square tone")["input_ids"])
    marked = [tok for tok, row in zip(tokens, numbers[0]) if row.abs().sum() > 0]
    assert marked == ["50", "##8"]  # both subwords of the number, nothing else
    assert float(numbers[2].abs().sum()) == 0.0 and float(text.pooled[2, 384:].abs().sum()) == 0.0
    # the code is smooth in log(value): 508 vs 523 Hz (3 %) differ less than 508 vs 1016 Hz (an octave)
    far = enc.encode(["a 1016 Hz square tone"]).tokens[0, 2, 384:]
    assert (numbers[0, 2] - numbers[1, 2]).norm() < (numbers[0, 2] - far).norm()
    assert torch.allclose(text.pooled[0, 384:], numbers[0, 2])
    # the language part is the plain encoder's
    plain = load_text_encoder({"name": "minilm"}).encode(["a 508 Hz square tone"])
    assert torch.allclose(plain.tokens[0], text.tokens[0, : plain.tokens.shape[1], :384], atol=1e-5)


def test_linear_number_channels_are_monotone_in_log_value():
    from models.text.encoders import LOG_CENTRE, LOG_SCALE

    fourier = load_text_encoder({"name": "minilm", "number_freqs": 16})
    enc = load_text_encoder({"name": "minilm", "number_freqs": 16, "number_linear": True})
    assert enc.dim == 384 + 32 + 2 and enc.pooled_dim == enc.dim
    prompts = ["a 508 Hz square tone", "a 523.5 Hz square tone", "clicks at 120 BPM", "rain on a roof"]
    text = enc.encode(prompts)
    linear = text.tokens[..., 416:]
    # the number's own tokens: (1, (ln v - centre) / scale); every other token zeros
    assert torch.allclose(linear[0, 2], torch.tensor([1.0, (math.log(508) - LOG_CENTRE) / LOG_SCALE]), atol=1e-6)
    assert torch.allclose(linear[1, 2], torch.tensor([1.0, (math.log(523.5) - LOG_CENTRE) / LOG_SCALE]), atol=1e-6)
    assert float(linear[0, 1].abs().sum()) == 0.0 and float(linear[3].abs().sum()) == 0.0
    assert linear[2, :, 1].max() < linear[0, 2, 1] < linear[1, 2, 1]  # 120 < 508 < 523.5, in that order
    assert torch.allclose(text.pooled[0, 416:], linear[0, 2])
    # the Fourier channels and the language part are the Fourier-only encoder's
    plain = fourier.encode(prompts[:1])
    assert torch.allclose(plain.tokens[0], text.tokens[0, : plain.tokens.shape[1], :416], atol=1e-5)
