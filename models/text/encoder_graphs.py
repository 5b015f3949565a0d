"""The text encoder's transformer on a GPU: 16-bit weights and one CUDA graph per (rows, tokens) bucket.

A T5 encoder's forward is a few hundred small kernels; for one prompt on an H200 it took 7 ms in eager float32
(``benchmarks/results/gpu_summary.md``), a third of what a whole Stable-Audio-Open-Small generation should take.
Captured, it is one replay, and in bfloat16 its weights are read at half the bytes.

``GraphedEncoder`` stands in for a transformers encoder (``model(input_ids=..., attention_mask=...)
.last_hidden_state``), so the encoders that call one (``HFTextEncoder``, the checkpoints' T5 and T5Gemma) take it
unchanged (``use_encoder_graphs``). Inputs are padded to a bucket: rows to ``models.cuda_capture.ROW_BUCKETS`` (the
padding rows repeat row 0) and tokens to a multiple of ``token_multiple`` (pad id 0, masked). Masked keys take no
part in attention, so a real token's state changes by float rounding only; the CPU tests run the same padding
without a graph. The states come back as float32, as the encoders' callers expect. Graphs are captured only on a
CUDA device, the ``max_graphs`` most recently used kept; a capture that fails turns them off (logged), and the
encoder runs eagerly.
"""
from __future__ import annotations

import logging
from functools import partial

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutput

from models.conditioning import pad_axis
from models.cuda_capture import GraphCache, capture, round_up, row_bucket

log = logging.getLogger("tta.text")


class GraphedEncoder(nn.Module):
    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None, graphs: bool = True,
                 token_multiple: int = 16, max_graphs: int = 16):
        super().__init__()
        self.model = model.to(dtype) if dtype is not None else model
        self.dtype, self.use_graphs = dtype, graphs
        self.token_multiple = token_multiple
        self.graphs: GraphCache[tuple[int, int], tuple] = GraphCache(max_graphs)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **_) -> BaseModelOutput:
        b, n = input_ids.shape
        key = (row_bucket(b), round_up(n, self.token_multiple))
        ids, mask = (_rows(pad_axis(x, key[1], 1), key[0]) for x in (input_ids, attention_mask))
        if ids.device.type != "cuda" or not self.use_graphs:
            states = self._encode(ids, mask)
        else:
            try:
                static_ids, static_mask, graph, states = self.graphs.get(key, partial(self._capture, key, ids, mask))
            except RuntimeError:
                # an encoder the device will not capture (an operation that syncs): it runs eagerly from now on
                log.exception("text encoder graph capture failed; the encoder runs without graphs")
                self.use_graphs = False
                states = self._encode(ids, mask)
            else:
                static_ids.copy_(ids)
                static_mask.copy_(mask)
                graph.replay()
        return BaseModelOutput(last_hidden_state=states[:b, :n].float().clone())

    def _encode(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

    def _capture(self, key: tuple[int, int], ids: Tensor, mask: Tensor, pool) -> tuple:
        static_ids, static_mask = ids.clone(), mask.clone()
        graph, states = capture(lambda: self._encode(static_ids, static_mask), pool)
        log.info("captured a text encoder graph", extra={"rows": key[0], "tokens": key[1],
                                                         "graphs": len(self.graphs) + 1})
        return static_ids, static_mask, graph, states


def _rows(x: Tensor, rows: int) -> Tensor:
    """``x`` with rows added up to ``rows``, each a copy of row 0."""
    extra = rows - x.shape[0]
    return x if extra == 0 else torch.cat([x, x[:1].expand(extra, *x.shape[1:])])


def use_encoder_graphs(text_encoder, dtype: torch.dtype | None = None, graphs: bool = True) -> bool:
    """Put the transformers model behind ``text_encoder`` (a ``CachedTextEncoder`` or the encoder itself) behind a
    ``GraphedEncoder``: weights in ``dtype``, graphs captured when ``graphs`` (on CUDA). False, and nothing changed,
    for an encoder without such a model or one already behind a ``GraphedEncoder`` (a text encoder that models of a
    process share is set up once)."""
    inner = getattr(text_encoder, "encoder", text_encoder)
    model = getattr(inner, "model", None)
    if not isinstance(model, nn.Module) or isinstance(model, GraphedEncoder):
        return False
    inner.model = GraphedEncoder(model, dtype, graphs)
    return True
