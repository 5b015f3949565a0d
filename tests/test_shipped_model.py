"""The trained teacher shipped in models/zoo loads with the network disabled and does what its prompt says."""
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle import ModelBundle
from models.registry import ZOO, available_models

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves it out

TEACHER = ZOO / "tta-teacher"


def _block_network(mp) -> None:
    """Any attempt to open a non-loopback connection fails the test."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1")):
            raise AssertionError(f"network access attempted: {address!r}")
        return real_connect(self, address)

    mp.setattr(socket.socket, "connect", guarded)
    mp.setenv("HF_HUB_OFFLINE", "1")


def test_zoo_lists_the_teacher_and_its_fast_models():
    names = [p.name for p in available_models()]
    assert {"tta-teacher", "tta-bsa-25", "tta-arc"} <= set(names)
    for p in available_models():
        for f in p.glob("*.safetensors"):
            assert f.stat().st_size < 60 * 2**20, f"{f} is over 60 MB"


@pytest.fixture(scope="module")
def teacher_tone():
    """The shipped teacher, loaded with the network disabled, asked for the issue's example prompt."""
    torch.set_num_threads(2)
    with pytest.MonkeyPatch.context() as mp:
        _block_network(mp)
        bundle = ModelBundle.load(TEACHER)
        wave = bundle.pipeline.generate(["a 440 Hz sine tone on the left"], [3.0], [0])[0]
    return bundle, wave


def test_shipped_teacher_loads_offline_and_generates(teacher_tone):
    bundle, wave = teacher_tone
    assert bundle.config.default_steps == 200 and bundle.config.sampler == "ddim"
    assert wave.shape == (2, 3 * 44100) and torch.isfinite(wave).all()


def test_shipped_teacher_makes_a_440_hz_tone_on_the_left(teacher_tone):
    from models.eval.pitch import PitchTracker

    _, wave = teacher_tone
    assert wave.abs().max() > 0.01, "the tone should be audible"
    f0 = PitchTracker("tiny").median_pitch(wave.numpy(), 44100)
    assert f0 is not None and abs(f0 - 440) / 440 <= 0.03, f"measured {f0} Hz"
    left, right = (wave ** 2).sum(-1)
    assert left > 2 * right, "the tone should be louder on the left"


def test_tta_generate_cli_writes_a_wav(tmp_path):
    import soundfile as sf

    out = tmp_path / "out.wav"
    cmd = [sys.executable, "-m", "service.cli", "generate", "a 440 Hz sine tone on the left", "-o", str(out),
           "--duration", "1.5", "--steps", "20", "--seed", "3", "--threads", "2"]
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parent.parent,
                   env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    audio, sr = sf.read(out)
    assert sr == 44100 and audio.shape == (round(1.5 * 44100), 2)
    assert np.isfinite(audio).all()


@pytest.mark.parametrize("name, kind, steps", [("tta-bsa-25", "bsa", 25), ("tta-arc", "arc", 8)])
def test_shipped_fast_models_take_one_forward_per_step(name, kind, steps):
    from training_support import count_denoiser_rows

    torch.set_num_threads(2)
    with pytest.MonkeyPatch.context() as mp:
        _block_network(mp)
        bundle = ModelBundle.load(ZOO / name)
    assert (bundle.config.kind, bundle.config.default_steps) == (kind, steps)
    assert bundle.denoiser.config.latent_dim == bundle.codec.latent_dim == 33
    rows = count_denoiser_rows(bundle)
    wave = bundle.pipeline.generate(["rain on a roof", "a 300 Hz square wave"], [1.0, 1.5], [1, 2])
    assert rows == [2] * steps  # guidance folded in (BSA) or absent (ARC): one row per sample per step
    assert [w.shape for w in wave] == [(2, 44100), (2, round(1.5 * 44100))]
    assert all(torch.isfinite(w).all() and w.abs().max() > 1e-3 for w in wave)
