"""Phrasing consistency for denoiser training: a caption's prediction of the codec's pitch channels is pulled
towards what a reference model (the EMA weights) predicts for the same noisy latents under the clip's canonical
caption (``models.data.corpus.canonical_caption``).

Why: the tenth-round teacher reads a stated pitch with a bias that depends on the words around it. On held-out
phrasings its reading from pure noise spreads with sd 0.053 in ln f over 12 captions of one pitch; with every token
state taken from one fixed prompt the spread is 0.018 (``benchmarks.pitch_reading``, phrasing sources;
``benchmarks/results/teacher_session21.md``). The v-MSE pulls every phrasing to the truth only through a target
that carries the step's noise; this term asks the phrasings to agree with each other on the same draw, a low-variance
target, as in mean-teacher consistency training (Tarvainen and Valpola, 2017).

Measured (session 21, 1500 steps warm-started from the tenth round with filler words; ``benchmarks/results/
teacher_session21.md``): no gain. Per element the term weighs (weight / (tone rows x channels)) against the v-MSE's
(analytic weight / (rows x weighted channels)), about 29 times as much at weight 3, where the model chased its own
EMA and the reading broke (19 % off); at weight 0.2 the reading holds but neither its spread over held-out phrasings
(0.052 against 0.053) nor the generated pitch (4.7 % against 4.6 % on 32 held-out tones) improves."""
from __future__ import annotations

import torch
from torch import Tensor

from models.data.corpus import canonical_caption
from models.training.batches import CaptionedBatch, masked_mse


def consistency_rows(batch: CaptionedBatch) -> list[int]:
    """The rows whose caption states a pitch (a tone's) and was not dropped for classifier-free guidance."""
    if batch.params is None:
        raise ValueError("phrasing consistency needs the batch's ground truth (CaptionedBatch.params)")
    return [i for i, (p, prompt) in enumerate(zip(batch.params, batch.prompts)) if prompt and "pitch_hz" in p]


def phrasing_consistency(out: Tensor, z: Tensor, t: Tensor, batch: CaptionedBatch, reference, text_encoder,
                         param, channels: int) -> Tensor:
    """Mean squared difference, over real frames of the leading ``channels`` latent channels, between the x0 that
    ``out`` (the model's raw prediction [B, C, T] for ``z`` at ``t``) implies and the x0 that ``reference`` predicts
    for the same rows under their canonical captions; 0 when no row states a pitch. ``param``: the model's
    parameterisation (``to_x0``)."""
    rows = consistency_rows(batch)
    if not rows:
        return out.new_zeros(())
    canon = text_encoder.encode([canonical_caption(batch.params[i]) for i in rows]).to(z.device)
    idx = torch.tensor(rows, device=z.device)
    zr, tr, mask = z[idx], t[idx], batch.mask[idx]
    with torch.no_grad():
        ref = reference(zr, tr, canon.tokens, canon.mask, canon.pooled, batch.seconds[idx], mask)
        x0_ref = param.to_x0(ref, zr, tr)[:, :channels]
    x0 = param.to_x0(out[idx], zr, tr)[:, :channels]
    return masked_mse(x0, x0_ref, mask).mean()
