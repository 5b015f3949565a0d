"""Teacher training end to end at toy size: the shipped codec encodes a few corpus clips, a DiT trains on them and
is exported as a bundle that loads and generates; a warm start onto a text encoder with the linear number channels
(and the rhythm and value conditioners) keeps what the old teacher computed."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.bundle import ModelBundle
from models.training.teacher import TeacherTrainConfig, train_teacher
from models.training.warm_start import DIT_TEXT_INPUTS

CODEC = "models/zoo/tta-codec"
TINY = {"width": 32, "depth": 1, "heads": 2, "batch_size": 2, "cache_clips": 3, "warmup": 1, "threads": 1,
        "checkpoint_every": 1000, "log_every": 1}


def test_warm_start_onto_linear_number_channels_and_the_number_conditioners(tmp_path):
    first = train_teacher(tmp_path / "old", tmp_path / "run-old", CODEC, TeacherTrainConfig(steps=2, **TINY))
    (tmp_path / "run-new").mkdir()
    (tmp_path / "run-new" / "latents").symlink_to(tmp_path / "run-old" / "latents")  # the same clips, encoded once
    cfg = TeacherTrainConfig(steps=1, lr=0.0, weight_decay=0.0, number_linear=True, rhythm=True, number_values=True,
                             init_from=str(first), **TINY)
    second = train_teacher(tmp_path / "new", tmp_path / "run-new", CODEC, cfg)

    config = json.loads((second / "config.json").read_text())
    assert config["text_encoder"] == {"name": "minilm", "number_freqs": 16, "number_linear": True}
    assert config["denoiser"]["text_dim"] == config["denoiser"]["pooled_dim"] == 384 + 32 + 2
    assert config["denoiser"]["rhythm_frame_rate"] == 44100 / 2048 and config["denoiser"]["number_values"]
    old, new = load_file(str(first / "denoiser.safetensors")), load_file(str(second / "denoiser.safetensors"))
    for key in DIT_TEXT_INPUTS:  # the old columns kept (lr 0), the two new ones start at zero
        assert torch.equal(new[key][:, :416], old[key]) and torch.all(new[key][:, 416:] == 0)
    # so the new teacher generates what the old one did: the number channels it cannot read yet change nothing
    prompt, seconds = ["a 440 Hz sine tone on the left"], [1.0]
    a = ModelBundle.load(first).pipeline.generate_latents(prompt, seconds, [3], steps=2)
    reloaded = ModelBundle.load(second)
    b = reloaded.pipeline.generate_latents(prompt, seconds, [3], steps=2)
    assert torch.allclose(a[0], b[0], atol=1e-6)
    with torch.no_grad():  # and the comparison can tell: weights on the new channels do change the output
        reloaded.denoiser.context_proj[0].weight[:, 416:].normal_(0, 1.0)
    assert not torch.allclose(a[0], reloaded.pipeline.generate_latents(prompt, seconds, [3], steps=2)[0], atol=1e-4)
    for module in ("rhythm", "values"):  # as do weights on the number conditioners, which start at zero
        assert torch.all(new[f"{module}.mix.weight"] == 0) and torch.all(new[f"{module}.mix.bias"] == 0)
        changed = ModelBundle.load(second)
        with torch.no_grad():
            getattr(changed.denoiser, module).mix.weight.normal_(0, 1.0)
        assert not torch.allclose(a[0], changed.pipeline.generate_latents(prompt, seconds, [3], steps=2)[0], atol=1e-4)


@pytest.mark.parametrize("conditioner", ["rhythm", "number_values"])
def test_the_number_conditioners_need_the_linear_number_channels(tmp_path, conditioner):
    with pytest.raises(ValueError, match="number_linear"):
        TeacherTrainConfig(steps=1, **{conditioner: True}, **TINY)


def test_a_masked_number_teacher_ships_an_encoder_that_masks(tmp_path):
    cfg = TeacherTrainConfig(steps=1, number_linear=True, number_masked=True, number_values=True, guidance=2.0,
                             **TINY)
    out = train_teacher(tmp_path / "out", tmp_path / "run", CODEC, cfg)
    config = json.loads((out / "config.json").read_text())
    assert config["default_guidance"] == 2.0 and "guidance 2)" in config["description"]
    assert config["text_encoder"] == {"name": "minilm", "number_freqs": 16, "number_linear": True,
                                      "number_masked": True}
    text = ModelBundle.load(out).encode_text(["a 408 Hz tone", "a 1141 Hz tone"])
    assert torch.equal(text.tokens[0, :, :384], text.tokens[1, :, :384])  # the encoder saw the same words
    assert not torch.equal(text.tokens[0, :, 384:], text.tokens[1, :, 384:])  # the channels carry the values


def test_values_only_needs_the_value_conditioner_and_records_the_number_width():
    with pytest.raises(ValueError, match="values_only"):
        TeacherTrainConfig(steps=1, number_linear=True, values_only=True, **TINY)
    cfg = TeacherTrainConfig(steps=1, number_linear=True, number_values=True, values_only=True, **TINY)
    denoiser = cfg.dit_config(latent_dim=33, latent_rate=21.5, text_dim=418, pooled_dim=418)
    assert denoiser.values_only and denoiser.number_width == cfg.numbers().width > 2


def test_a_training_config_with_retired_keys_loads_without_them_and_warns(caplog, monkeypatch):
    """The shipped teacher's training block loads as it is; one that still holds the keys of options since removed
    (a value head, filler words) loads without them, and the log names each; an unknown key is still an error."""
    import logging

    monkeypatch.setattr(logging.getLogger("tta"), "propagate", True)  # the service's logging setup turns it off
    shipped = json.loads(Path("models/zoo/tta-teacher/config.json").read_text())["training"]
    cfg = TeacherTrainConfig.from_config(shipped)
    assert cfg.steps == shipped["steps"] and cfg.number_values and cfg.guidance == shipped["guidance"]
    with caplog.at_level("WARNING", logger="tta.models"):
        old = TeacherTrainConfig.from_config({**shipped, "value_head": False, "value_head_lr_scale": 30.0,
                                              "filler_words": 0.0})
    assert old == cfg
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert all(k in warned for k in ("value_head", "value_head_lr_scale", "filler_words"))
    with pytest.raises(TypeError, match="no_such_option"):
        TeacherTrainConfig.from_config({**shipped, "no_such_option": 1})


def test_masking_without_number_channels_is_refused_by_the_config():
    """Refused when the settings are made, before a run builds its latent cache."""
    with pytest.raises(ValueError, match="needs number channels"):
        TeacherTrainConfig(steps=1, number_freqs=0, number_masked=True, **TINY)


def _trained_weights(out) -> dict:
    return load_file(str(out / "denoiser.safetensors"))


@pytest.mark.slow
def test_a_stopped_teacher_run_resumes_to_the_weights_of_an_unbroken_one(tmp_path):
    cfg = TeacherTrainConfig(steps=3, **TINY)
    whole = _trained_weights(train_teacher(tmp_path / "whole", tmp_path / "run-whole", CODEC, cfg))
    train_teacher(tmp_path / "part", tmp_path / "run-part", CODEC, cfg, stop_at=1)
    resumed = _trained_weights(train_teacher(tmp_path / "part", tmp_path / "run-part", CODEC, cfg))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert json.loads((tmp_path / "part" / "config.json").read_text())["training"]["steps_done"] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_teacher_trains_on_cuda_and_exports_the_same_files(tmp_path):
    cfg = TeacherTrainConfig(steps=2, **TINY)
    on_cpu = _trained_weights(train_teacher(tmp_path / "cpu", tmp_path / "run-cpu", CODEC, cfg))
    out = train_teacher(tmp_path / "gpu", tmp_path / "run-gpu", CODEC,
                        TeacherTrainConfig(steps=2, device="cuda", **TINY))
    on_gpu = _trained_weights(out)
    assert all(v.device.type == "cpu" for v in on_gpu.values())
    assert all(torch.allclose(on_cpu[k], on_gpu[k], atol=1e-2) for k in on_cpu)
    wave = ModelBundle.load(out).pipeline.generate(["a 300 Hz sine tone"], [1.0], [0], steps=2)[0]
    assert torch.isfinite(wave).all()
