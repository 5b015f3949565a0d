"""The T5Gemma text encoder of Stable Audio 3 (``google/t5gemma-b-b-ul2``'s encoder: 768-wide states), loaded with
transformers' ``T5GemmaEncoderModel`` from local files only, in float32.

It is a ``LocalT5Encoder`` in every way but the model class: per prompt the last hidden state over its real tokens,
independent of the other prompts of the batch (its attention is bidirectional and masked, and its rotary positions
relative, so how much padding a batch adds changes nothing beyond float rounding). Prompts are padded on the right,
whatever the tokenizer's own side (Gemma's is the left), so that a prompt's tokens come first.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from models.checkpoints.text import LocalT5Encoder
from models.checkpoints.weights import CheckpointError, load_checked
from models.text.encoders import CachedTextEncoder, NumberChannels

MODEL_TYPE = "t5gemma"


class LocalT5GemmaEncoder(LocalT5Encoder):
    """``state_dict``: weights that replace the directory's (a checkpoint that stores its own fine-tuned copy of
    the encoder), fitted strictly; ``source`` names them in errors."""

    def __init__(self, model_path: str | Path, tokenizer_path: str | Path | None = None, max_length: int = 256,
                 device: str | torch.device = "cpu", state_dict: dict[str, Tensor] | None = None, source: str = ""):
        try:
            from transformers import AutoConfig, AutoTokenizer, T5GemmaEncoderModel
        except ImportError as exc:
            raise CheckpointError("Stable Audio 3's text encoder needs a transformers with T5Gemma (4.53 or newer)") \
                from exc

        self.path, tok_path = Path(model_path), Path(tokenizer_path or model_path)
        try:
            config = AutoConfig.from_pretrained(self.path, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
        except Exception as exc:  # a missing folder, or one transformers cannot read
            raise CheckpointError(f"{self.path}: no T5Gemma encoder (with its tokenizer in {tok_path}) can be read "
                                  f"from local files ({exc})") from exc
        if config.model_type != MODEL_TYPE:
            raise CheckpointError(f"{self.path}: text encoder of type {config.model_type!r}; Stable Audio 3 needs "
                                  f"{MODEL_TYPE!r} (google/t5gemma-b-b-ul2)")
        config.is_encoder_decoder = False  # the encoder alone, as the references load it
        self.tokenizer.padding_side = "right"
        self.model = T5GemmaEncoderModel.from_pretrained(self.path, config=config, local_files_only=True,
                                                         dtype=torch.float32)
        if state_dict:
            load_checked(self.model, state_dict, source, "text encoder")
        self.model.eval().to(device)
        self.kind = MODEL_TYPE
        self.device = torch.device(device)
        self.max_length = int(max_length)
        self.dim = self.pooled_dim = int(config.encoder.hidden_size)
        self.name = self.path.name
        self.normalize_pooled = False
        self.numbers = NumberChannels()


def load_t5gemma(model_path: Path, tokenizer_path: Path | None, max_length: int, device: str = "cpu",
                 state_dict: dict[str, Tensor] | None = None, source: str = "",
                 cache_size: int = 4096) -> CachedTextEncoder:
    return CachedTextEncoder(LocalT5GemmaEncoder(model_path, tokenizer_path, max_length, device, state_dict, source),
                             maxsize=cache_size)
