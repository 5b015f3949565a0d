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


def sa3_config(model: str = "sa3-small", scale: str = "full") -> dict:
    """Stable Audio 3's components as diffusers' ``StableAudio3Pipeline`` configures them: ``transformer``
    (StableAudio3DiTModel), ``vae`` (AutoencoderSAME), ``duration_embedder``, ``text_encoder`` (the T5Gemma encoder's
    module config), ``scheduler`` (FlowMatchEulerDiscreteScheduler, stochastic: the distilled model) and
    ``text_len`` (the tokenizer's length). Small: DiT 1024 wide, 20 layers, 16 heads, plain attention, SAME-S
    (768 wide, 6 layers); Medium: DiT 1536 wide, 24 layers, 24 heads, differential attention, SAME-L (1536 wide,
    12 layers, sin-gated feed-forward in its last 8 decoder layers). Both: 256 latent channels at 4096 samples per
    latent (patch 256 x stride 16), 64 memory tokens, 768-wide T5Gemma (google/t5gemma-b-b-ul2's encoder: 12 layers,
    12 heads of 64, GeGLU 2048, 256000 tokens) and duration embedding (0 .. 384 s). "tiny" keeps every structural
    option at test size (8 latent channels, 16 samples per latent at 8 kHz)."""
    if model not in ("sa3-small", "sa3-medium") or scale not in ("full", "tiny"):
        raise ValueError(f"unknown Stable Audio 3 model / scale {model!r} / {scale!r}")
    medium, full = model == "sa3-medium", scale == "full"
    if full:
        width, depth, heads = (1536, 24, 24) if medium else (1024, 20, 16)
        latent, cond, features, memory = 256, 768, 256, 64
        vae = {"patch_size": 256, "encoder_channels": 256 if medium else 128, "encoder_strides": [16],
               "encoder_transformer_depths": [12 if medium else 6], "dim_heads": 64, "sampling_rate": 44100}
        text = {"vocab_size": 256000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
                "num_attention_heads": 12, "num_key_value_heads": 12, "head_dim": 64, "query_pre_attn_scalar": 64}
    else:
        width, depth, heads = 128, 2, 2  # heads of 64 channels: the rotary width both layouts agree on
        latent, cond, features, memory = 8, 24, 32, 4
        vae = {"patch_size": 4, "encoder_channels": 8, "encoder_strides": [4], "encoder_transformer_depths": [2],
               "dim_heads": 16, "sampling_rate": 8000}
        text = {"vocab_size": 64, "hidden_size": cond, "intermediate_size": 48, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 12, "query_pre_attn_scalar": 12}
    return {
        "transformer": {"io_channels": latent, "patch_size": 1, "embed_dim": width, "depth": depth, "num_heads": heads,
                        "cond_token_dim": cond, "global_cond_dim": cond, "local_add_cond_dim": 1 + latent,
                        "timestep_features_dim": features, "ff_mult": 4.0 if full else 2.0,
                        "num_memory_tokens": memory, "use_differential_attention": medium},
        "vae": {"audio_channels": 2, "encoder_c_mults": [6 if full else 4], "latent_dim": latent,
                "use_differential_attention": True, "ff_mult": 3, "sliding_window": 1,
                "encoder_sinusoidal_blocks": [0], "decoder_sinusoidal_blocks": [(8 if full else 1) if medium else 0],
                **vae},
        # 256 Fourier features at every scale: Stability's number conditioner has no other width
        "duration_embedder": {"output_dim": cond, "fourier_dim": 256, "min_val": 0.0, "max_val": 384.0,
                              "min_freq": 0.5, "max_freq": 10000.0},
        "text_encoder": {**text, "rms_norm_eps": 1e-6, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2},
        "scheduler": {"num_train_timesteps": 1, "shift": 1.0, "stochastic_sampling": True},
        "text_len": 256 if full else 16,
    }
