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


def test_number_spans_mask_stated_values_but_not_note_names():
    from models.text.encoders import NUMBER_PLACEHOLDER, number_spans

    prompt = "an A4 and a C#5 at 1141 Hz, clicks at 92.5 BPM"
    assert number_spans(prompt) == (prompt, [(4, 5, 4.0), (14, 15, 5.0), (19, 23, 1141.0), (38, 42, 92.5)])
    text, spans = number_spans(prompt, masked=True)
    assert text == f"an A4 and a C#5 at {NUMBER_PLACEHOLDER} Hz, clicks at {NUMBER_PLACEHOLDER} BPM"
    assert [v for _, _, v in spans] == [4.0, 5.0, 1141.0, 92.5]
    assert [text[a:b] for a, b, _ in spans] == ["4", "5", NUMBER_PLACEHOLDER, NUMBER_PLACEHOLDER]
    assert number_spans("rain on a roof", masked=True) == ("rain on a roof", [])


def test_a_masking_encoder_states_no_value_but_its_number_channels_do():
    from models.text.encoders import LOG_CENTRE, LOG_SCALE

    enc = load_text_encoder({"name": "minilm", "number_freqs": 4, "number_linear": True, "number_masked": True})
    text = enc.encode(["a 408 Hz tone", "a 1141 Hz tone", "an A4 tone", "an A5 tone"])
    base = 384
    # the language part is the same for both stated pitches, and so is the pooled embedding's
    n = int(text.mask[0].sum())
    assert int(text.mask[1].sum()) == n
    assert torch.allclose(text.tokens[0, :n, :base], text.tokens[1, :n, :base], atol=1e-6)
    assert torch.allclose(text.pooled[0, :base], text.pooled[1, :base], atol=1e-6)
    # while the values reach the number channels
    assert torch.allclose(text.tokens[:2, 2, -2:], torch.tensor([[1.0, (math.log(v) - LOG_CENTRE) / LOG_SCALE]
                                                                 for v in (408, 1141)]), atol=1e-6)
    # a note name keeps its octave: A4 and A5 read differently to the encoder itself
    assert (text.tokens[2, :, :base] - text.tokens[3, :, :base]).abs().max() > 1e-2


def test_masking_needs_number_channels():
    with pytest.raises(ValueError, match="needs number channels"):
        load_text_encoder({"name": "minilm", "number_masked": True})


@pytest.mark.parametrize("config", [{"number_freqs": 0}, {"number_freqs": 16, "number_linear": True},
                                    {"number_freqs": 0, "number_linear": True, "number_masked": True}])
def test_number_channels_read_back_the_config_they_write(config):
    from models.text import NumberChannels

    numbers = NumberChannels.from_config({"name": "minilm", **config})
    assert numbers.to_config() == config
    assert numbers.width == 2 * config["number_freqs"] + 2 * config.get("number_linear", False)
    assert NumberChannels.from_config(numbers.to_config()) == numbers


def test_the_prompt_cache_is_bounded_in_bytes_and_owns_its_tensors(text_encoder):
    from models.text.encoders import CachedTextEncoder, entry_bytes

    cache = CachedTextEncoder(text_encoder.encoder, maxsize=1000, max_bytes=150_000)
    prompts = [f"prompt number {i}: " + "rain on a tin roof and distant thunder " * 8 for i in range(12)]
    first = cache.encode(prompts[:6])
    cache.encode(prompts[6:])
    one = entry_bytes(next(iter(cache._cache.values())))
    assert one > 20_000  # long prompts: tens of kB each
    assert cache.bytes <= 150_000 and len(cache._cache) == 150_000 // one < 12
    assert cache.bytes == sum(entry_bytes(e) for e in cache._cache.values())
    assert all(t._base is None for e in cache._cache.values() for t in e)  # not views of a whole batch
    again = cache.encode(prompts[:6])  # evicted ones are encoded again, to the same values
    assert torch.equal(again.tokens, first.tokens) and torch.equal(again.pooled, first.pooled)
