"""T5 text encoders of checkpoint directories: model and tokenizer may sit in different folders (diffusers keeps
``text_encoder/`` and ``tokenizer/`` apart), everything loads from local files only, in float32."""
from __future__ import annotations

from pathlib import Path

import torch

from models.checkpoints.weights import CheckpointError
from models.text.encoders import CachedTextEncoder, NumberChannels, TextEmbedding, TextEncoder, assemble

T5_KINDS = ("t5", "mt5", "umt5")


class LocalT5Encoder(TextEncoder):
    """A T5 encoder whose tokenizer may live in another directory, with ``encode_unpadded`` like ``HFTextEncoder``
    (so ``CachedTextEncoder`` can front it): per prompt the last hidden state over its real tokens, independent of
    the other prompts of the batch. The references feed exactly these states (zero past the prompt) to the models;
    the pooled mean is unused by them."""

    def __init__(self, model_path: str | Path, tokenizer_path: str | Path | None = None, max_length: int = 128,
                 device: str | torch.device = "cpu"):
        from transformers import AutoConfig, AutoTokenizer, T5EncoderModel

        self.path = Path(model_path)
        tok_path = Path(tokenizer_path) if tokenizer_path else self.path
        for p in (self.path, tok_path):
            if not p.is_dir():
                raise CheckpointError(f"text encoder directory {p} does not exist")
        try:
            config = AutoConfig.from_pretrained(self.path, local_files_only=True)
        except Exception as exc:
            raise CheckpointError(f"{self.path}: not a transformers model directory ({exc})") from exc
        if config.model_type not in T5_KINDS:
            raise CheckpointError(f"{self.path}: text encoder of type {config.model_type!r} is not supported "
                                  f"(expected one of {T5_KINDS})")
        self.kind = config.model_type
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
        except Exception as exc:
            raise CheckpointError(f"{tok_path}: no usable tokenizer ({exc})") from exc
        self.model = T5EncoderModel.from_pretrained(self.path, local_files_only=True, dtype=torch.float32)
        self.model.eval().to(device)
        self.device = torch.device(device)
        self.max_length = int(max_length)
        self.dim = int(config.d_model)
        self.pooled_dim = self.dim
        self.name = self.path.name
        self.normalize_pooled = False  # the pooled mean is unused by these models; kept plain (the export reads it)
        self.numbers = NumberChannels()  # no number channels appended (the embedded MiniLM encoder's feature)

    @torch.inference_mode()
    def encode_unpadded(self, prompts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batch = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        states = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        states = states.float()
        mask = batch["attention_mask"].bool()
        lengths = mask.sum(1).tolist()
        out = []
        for i, n in enumerate(lengths):
            tokens = states[i, :n].cpu()
            out.append((tokens, tokens.mean(0) if n else tokens.new_zeros(self.dim)))
        return out

    def encode(self, prompts: list[str]) -> TextEmbedding:
        return assemble(self.encode_unpadded(prompts))


def load_t5(model_path: Path, tokenizer_path: Path | None, max_length: int, device: str = "cpu",
            cache_size: int = 4096) -> CachedTextEncoder:
    return CachedTextEncoder(LocalT5Encoder(model_path, tokenizer_path, max_length, device), maxsize=cache_size)


def find_t5_dir(root: Path, hint: str | None = None) -> tuple[Path, Path | None]:
    """Where a checkpoint directory keeps its T5: ``text_encoder/`` (tokenizer inside it or in ``tokenizer/``) or a
    folder named after the model (``t5-base``, ``flan-t5-large``, ...). Clear error listing the places tried."""
    tried = []
    names = ["text_encoder"] + ([hint.split("/")[-1]] if hint else []) + ["t5", "t5-base"]
    for name in dict.fromkeys(names):
        cand = root / name
        tried.append(str(cand))
        if (cand / "config.json").is_file():
            tok = root / "tokenizer"
            return cand, (tok if tok.is_dir() and not _has_tokenizer(cand) else None)
    raise CheckpointError(f"{root}: no T5 text encoder found; the model needs {hint or 't5-base'} as a local "
                          f"transformers directory at one of {tried} (config.json, weights and tokenizer files)")


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "spiece.model", "tokenizer_config.json"))
