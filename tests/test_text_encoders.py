"""Text encoders load from local directories only: the shipped MiniLM and any T5 encoder directory."""
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
