"""Random-weight checkpoints of a published size (models.checkpoints.sized): the tiny scale is written, found by
the registry, loaded through the service's loader and generates; the full Stable Audio Open Small and 1.0 sizes are
checked on the meta device (parameter counts, and every written name and shape fits the loader) without allocating
them."""
from __future__ import annotations

import pytest
import torch
from conftest import float32_default

from models.registry import available_models
from models.checkpoints import detect_format, load_checkpoint_dir
from models.checkpoints import format_stable_audio_tools as sat_format
from models.checkpoints.reference_configs import sao_1_config, sao_small_config
from models.checkpoints.sized import (
    build_sao_small,
    build_sized,
    sao_small_parameter_counts,
    sized_parameter_counts,
    to_stable_audio_tools,
    write_random_sao_small,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with float32_default():
        root = tmp_path_factory.mktemp("zoo") / "sao-small-sized"
        counts = write_random_sao_small(root, scale="tiny", seed=3)
    return root, counts


def test_tiny_is_served_through_the_registry_and_generates(tiny):
    from service.app import load_model
    from service.settings import Settings

    root, counts = tiny
    assert detect_format(root) == "stable-audio-tools"
    assert available_models(root.parent) == [root]
    settings = Settings(_env_file=None, model_dir=root.parent, default_model=root.name, threads=1,
                        log_level="warning")
    rt = load_model(root, settings)
    assert (rt.name, rt.model_name) == ("torch", "sao-small-sized")
    b = rt.bundle
    assert (b.config.sampler, b.config.default_steps, b.config.default_guidance) == ("pingpong", 8, 1.0)
    assert "RANDOM weights" in b.config.description
    assert b.text_encoder.dim == 32 and b.text_encoder.encoder.max_length == 12
    wave = b.pipeline.generate(["Rain on a tin roof, then thunder"], [0.016], [0])[0]
    assert wave.shape == (2, 128) and bool(torch.isfinite(wave).all()) and float(wave.abs().max()) > 0
    assert counts["dit"] == sum(p.numel() for p in b.denoiser.dit.parameters())


def test_the_offline_cli_runs_a_checkpoint_directory_as_the_server_does(tiny, tmp_path, capsys):
    """``tta generate`` loads through the service's registry, runtime and engine: a checkpoint directory works, and
    its audio equals the pipeline's for the same seed."""
    import soundfile as sf

    from service.audio import to_pcm16
    from service.cli import main

    import json
    import shutil

    root = tmp_path / "sao-small-sized"
    shutil.copytree(tiny[0], root)
    # the tiny scale's own limit is 16 ms, under the API's 0.5 s minimum; serving.json lifts it, as for any checkpoint
    (root / "serving.json").write_text(json.dumps({"max_duration": 1.0, "default_duration": 0.5}))
    out = tmp_path / "rain.wav"
    main(["generate", "Rain on a tin roof", "--model", str(root), "--duration", "0.5", "--seed", "4", "--steps", "2",
          "-o", str(out)])
    assert "model sao-small-sized (torch), 2 steps" in capsys.readouterr().out
    audio, sr = sf.read(out, dtype="int16")
    pipeline = load_checkpoint_dir(root).pipeline
    assert sr == pipeline.sample_rate and audio.shape == (round(0.5 * sr), 2)  # the tiny scale's codec rate
    ref = pipeline.generate(["Rain on a tin roof"], [0.5], [4], steps=2)[0]
    assert (audio.astype(int) - to_pcm16(ref).astype(int)).__abs__().max() <= 1
    with pytest.raises(SystemExit, match="exceeds model sao-small-sized's maximum"):
        main(["generate", "x", "--model", str(root), "--duration", "2", "-o", str(out)])


@torch.no_grad()
def test_the_written_weights_load_unchanged(tiny):
    root, _ = tiny
    _, parts, t5 = build_sao_small("tiny", seed=3)
    bundle = load_checkpoint_dir(root)
    pairs = [(parts.dit, bundle.denoiser.dit), (parts.numbers, bundle.denoiser.numbers), (parts.codec, bundle.codec),
             (t5, bundle.text_encoder.encoder.model)]
    for ours, loaded in pairs:
        mine, theirs = ours.state_dict(), loaded.state_dict()
        assert mine.keys() == theirs.keys()
        for k in mine:  # the VAE's convolutions went through weight norm and back
            assert torch.allclose(mine[k], theirs[k], rtol=1e-5, atol=1e-7), k
    assert not any(bool((p == 0).all()) for n, p in parts.dit.named_parameters() if n.endswith("weight")
                   and p.dim() > 1), "no zero-initialised matrices: the network computes something"


def test_the_tokenizer_ends_prompts_and_marks_unknown_words(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny[0] / "text_encoder", local_files_only=True)
    assert tok("Warm pad, xylophone")["input_ids"] == [41, 36, 3, 2, 1]


def test_a_non_empty_directory_is_not_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_random_sao_small(tmp_path, scale="tiny")


def test_the_cli_writes_and_prints_the_parameter_counts(tmp_path, capsys):
    from service.cli import main

    main(["sized", "sao-small", "--out", str(tmp_path / "s"), "--scale", "tiny", "--seed", "1"])
    printed = capsys.readouterr().out
    assert "random weights" in printed and "dit" in printed and "vae decoder" in printed
    assert "text encoder" in printed and detect_format(tmp_path / "s") == "stable-audio-tools"


def test_full_size_counts_and_names_without_allocating():
    """The paper's scale: DiT about 341M parameters (1024 wide, 16 layers), T5-base encoder about 110M; everything
    the writer would save fits the loader's config check, on the meta device."""
    counts = sao_small_parameter_counts("full")
    assert 340e6 < counts["dit"] < 342e6, counts
    assert 109e6 < counts["text_encoder"] < 110.5e6, counts
    assert 50e6 < counts["vae_decoder"] < 120e6, counts
    plan, parts, _ = build_sao_small("full", device="meta")
    assert (plan.dit.embed_dim, plan.dit.depth, plan.dit.num_heads, plan.dit.io_channels) == (1024, 16, 8, 64)
    assert (plan.codec.strides, plan.text_len, plan.cond_dim, plan.sample_size // plan.codec.hop) == (
        [2, 4, 4, 8, 8], 64, 768, 256)
    state = to_stable_audio_tools(parts.state_dict(), plan)
    assert state["model.model.transformer.layers.0.pre_norm.gamma"].is_meta
    assert "pretransform.model.decoder.layers.1.layers.1.weight_g" in state
    sat_format.validate_shapes(sao_small_config("full"), {k: tuple(v.shape) for k, v in state.items()})


def test_stable_audio_open_1_at_full_size_without_allocating():
    """Stable Audio Open 1.0: DiT about 1.06 B parameters (1536 wide, 24 layers, 24 heads, v objective), over 2 GiB
    of float32 (its ONNX export keeps the weights beside the graph); seconds_start and seconds_total condition it
    twice; every name and shape the writer would save fits the loader."""
    counts = sized_parameter_counts("sao-1.0")
    assert 1.05e9 < counts["dit"] < 1.07e9 and counts["dit"] * 4 > 2**31, counts
    plan, parts, _ = build_sized("sao-1.0", device="meta")
    assert (plan.dit.embed_dim, plan.dit.depth, plan.dit.num_heads, plan.objective) == (1536, 24, 24, "v")
    assert (plan.text_len, plan.sample_size // plan.codec.hop) == (128, 1024)
    state = to_stable_audio_tools(parts.state_dict(), plan)
    sat_format.validate_shapes(sao_1_config("full"), {k: tuple(v.shape) for k, v in state.items()})
