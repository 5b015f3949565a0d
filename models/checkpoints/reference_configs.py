"""Published model configurations in their own checkpoint formats, for building models of the published size
(``models.checkpoints.sized``) and for the parity tests (tests/test_checkpoints.py)."""
from __future__ import annotations

import math


def sao_small_config(scale: str = "full") -> dict:
    """Stable Audio Open Small's ``model_config.json`` (stable-audio-tools format; the parts that define the
    networks): DiT 1024 wide, 16 layers, 8 heads over 64 latent channels, 524288 samples at 44.1 kHz (256 latent
    frames, about 11.9 s), T5-base prompts of at most 64 tokens plus seconds_total, Oobleck VAE with strides
    2, 4, 4, 8, 8. "tiny" scales widths and depths down for CPU and keeps every structural option (QK LayerNorm,
    prepended global token, projected conditioning tokens, partial rotary, T5 + seconds_total, VAE bottleneck,
    Oobleck with snake)."""
    if scale not in ("full", "tiny"):
        raise ValueError(f"scale must be 'full' or 'tiny', not {scale!r}")
    full = scale == "full"
    ch, mults, strides = (128, [1, 2, 4, 8, 16], [2, 4, 4, 8, 8]) if full else (8, [1, 2], [2, 4])
    latent = 64 if full else 8
    cond = 768 if full else 32
    return {
        "model_type": "diffusion_cond",
        "sample_size": 524288 if full else 128,
        "sample_rate": 44100 if full else 8000,
        "audio_channels": 2,
        "model": {
            "pretransform": {
                "type": "autoencoder", "iterate_batch": True, "model_half": full,
                "config": {
                    "encoder": {"type": "oobleck", "config": {"in_channels": 2, "channels": ch, "c_mults": mults,
                                                              "strides": strides, "latent_dim": 2 * latent,
                                                              "use_snake": True}},
                    "decoder": {"type": "oobleck", "config": {"out_channels": 2, "channels": ch, "c_mults": mults,
                                                              "strides": strides, "latent_dim": latent,
                                                              "use_snake": True, "final_tanh": False}},
                    "bottleneck": {"type": "vae"}, "latent_dim": latent,
                    "downsampling_ratio": math.prod(strides), "io_channels": 2,
                },
            },
            "conditioning": {
                "configs": [
                    {"id": "prompt", "type": "t5", "config": {"t5_model_name": "t5-base" if full else "t5-small",
                                                              "max_length": 64 if full else 12}},
                    {"id": "seconds_total", "type": "number", "config": {"min_val": 0, "max_val": 256}},
                ],
                "cond_dim": cond,
            },
            "diffusion": {
                "cross_attention_cond_ids": ["prompt", "seconds_total"],
                "global_cond_ids": ["seconds_total"],
                "diffusion_objective": "rectified_flow",
                "type": "dit",
                "config": {"io_channels": latent, "embed_dim": 1024 if full else 128, "depth": 16 if full else 2,
                           "num_heads": 8 if full else 2, "cond_token_dim": cond, "global_cond_dim": cond,
                           "project_cond_tokens": True, "transformer_type": "continuous_transformer",
                           "attn_kwargs": {"qk_norm": "ln"}},
            },
            "io_channels": latent,
        },
    }


def sao_1_config(scale: str = "full") -> dict:
    """Stable Audio Open 1.0's ``model_config.json`` in stable-audio-tools format (the parts that define the
    networks): DiT 1536 wide, 24 layers, 24 heads over 64 latent channels with the v objective, 2097152 samples
    (1024 latent frames, about 47.6 s), T5-base prompts of at most 128 tokens plus seconds_start and seconds_total in
    the cross-attention input and the global condition, conditioning tokens used unprojected (the model attends to
    them at its own width through its key/value projections), no QK norm; the same Oobleck VAE as Stable Audio Open
    Small. "tiny" keeps that structure at test size, with conditioning tokens narrower than the model and a T5 wider
    than cond_dim (projected)."""
    if scale not in ("full", "tiny"):
        raise ValueError(f"scale must be 'full' or 'tiny', not {scale!r}")
    full = scale == "full"
    cfg = sao_small_config(scale)
    if full:
        cfg["sample_size"] = 2097152
        cfg["model"]["pretransform"]["model_half"] = False
    cond = cfg["model"]["conditioning"]
    cond["cond_dim"] = 768 if full else 64
    cond["configs"] = [{"id": "prompt", "type": "t5", "config": {"t5_model_name": "t5-base",
                                                                  "max_length": 128 if full else 12}},
                       {"id": "seconds_start", "type": "number", "config": {"min_val": 0, "max_val": 512}},
                       {"id": "seconds_total", "type": "number", "config": {"min_val": 0, "max_val": 512}}]
    d = cfg["model"]["diffusion"]
    d.update(diffusion_objective="v", cross_attention_cond_ids=["prompt", "seconds_start", "seconds_total"],
             global_cond_ids=["seconds_start", "seconds_total"])
    d["config"].update(embed_dim=1536 if full else 128, depth=24 if full else 2, num_heads=24 if full else 2,
                       cond_token_dim=cond["cond_dim"], global_cond_dim=1536 if full else 128,
                       project_cond_tokens=False)
    d["config"].pop("attn_kwargs")
    return cfg
