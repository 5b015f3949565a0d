"""The lossy and raw response formats of POST /generate (mp3, opus, pcm) against a real server: each decodes to the
audio the WAV of the same seed holds, at the length and rate its format promises; the MP3 bitrate setting sets the
size."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import soundfile as sf
from conftest import float32_default
from scipy.signal import butter, resample_poly, sosfiltfilt, welch

from service.audio import AUDIO_CONTENT, FORMATS, encode_audio, mp3_compression_level
from service.settings import MP3_BITRATES_KBPS, Settings
from service_support import LiveServer

SR = 44100
DURATION = 2.3
FRAMES = round(DURATION * SR)
BODY = {"prompt": "a kettle whistles over rain", "duration": DURATION, "seed": 1234, "steps": 3}


def generate(srv, fmt: str):
    with srv.client() as c:
        r = c.post("/generate", json={**BODY, "format": fmt})
    assert r.status_code == 200, r.text
    return r


@pytest.fixture(scope="module")
def reference(server) -> np.ndarray:
    """The WAV of the request: [frames, 2] float (made before the per-test float32 default applies)."""
    with float32_default():
        wav = generate(server, "wav").content
    audio, rate = sf.read(io.BytesIO(wav), dtype="float64", always_2d=True)
    assert (rate, audio.shape) == (SR, (FRAMES, 2)) and np.abs(audio).max() > 0.01
    return audio


def similarity(decoded: np.ndarray, reference: np.ndarray, rate: int) -> tuple[float, float]:
    """The worst channel's waveform correlation below 8 kHz (aligned: the decoders trim the codecs' delay; above,
    perceptual codecs keep a band's energy rather than its waveform) and log-spectral distance (dB rms over
    0-16 kHz, Welch periodograms): what an encoder writing shifted, scrambled, garbage or silent audio cannot match.
    Measured on these tiny models' 2.3 s: mp3 at 192 kbit/s 0.97 and 0.3 dB, opus 0.95; the 16-bit path into LAME
    that scrambles its input (see ``encode_audio``) 0.02-0.09."""
    low = butter(8, 8000, fs=rate, output="sos")
    worst_corr, worst_lsd = 1.0, 0.0
    for ch in range(2):
        a, b = decoded[:, ch], reference[:, ch]
        worst_corr = min(worst_corr, float(np.corrcoef(sosfiltfilt(low, a), sosfiltfilt(low, b))[0, 1]))
        f, pa = welch(a, rate, nperseg=2048)
        _, pb = welch(b, rate, nperseg=2048)
        band = f < 16000
        lsd = np.sqrt(np.mean((10 * np.log10(pa[band] + 1e-12) - 10 * np.log10(pb[band] + 1e-12)) ** 2))
        worst_lsd = max(worst_lsd, float(lsd))
    return worst_corr, worst_lsd


def test_mp3_is_the_wav_audio_at_44k1(server, reference):
    r = generate(server, "mp3")
    assert r.headers["content-type"] == "audio/mpeg"
    assert r.headers["x-seed"] == "1234"
    info = sf.info(io.BytesIO(r.content))
    assert (info.format, info.subtype) == ("MP3", "MPEG_LAYER_III")
    audio, rate = sf.read(io.BytesIO(r.content), dtype="float64", always_2d=True)
    assert (rate, audio.shape) == (SR, (FRAMES, 2))  # the decoder trims LAME's delay and padding
    corr, lsd = similarity(audio, reference, SR)
    assert corr > 0.9 and lsd < 3.0, (corr, lsd)


def test_opus_is_the_wav_audio_at_48k(server, reference):
    r = generate(server, "opus")
    assert r.headers["content-type"] == "audio/ogg; codecs=opus"
    info = sf.info(io.BytesIO(r.content))
    assert (info.format, info.subtype) == ("OGG", "OPUS")
    audio, rate = sf.read(io.BytesIO(r.content), dtype="float64", always_2d=True)
    assert (rate, audio.shape) == (48000, (math.ceil(FRAMES * 48000 / SR), 2))
    expected = resample_poly(reference, 160, 147, axis=0)  # 48000 / 44100
    corr, lsd = similarity(audio, expected, 48000)
    assert corr > 0.9 and lsd < 3.0, (corr, lsd)


def test_pcm_is_the_wav_samples_without_header(server, reference):
    r = generate(server, "pcm")
    assert r.headers["content-type"] == "audio/pcm"
    samples = np.frombuffer(r.content, dtype="<i2").reshape(-1, 2)
    assert samples.shape == (FRAMES, 2)
    np.testing.assert_array_equal(samples, np.round(reference * 32768).astype(np.int16))


def test_the_openapi_schema_lists_every_format(server):
    with server.client() as c:
        spec = c.get("/openapi.json").json()
    content = spec["paths"]["/generate"]["post"]["responses"]["200"]["content"]
    assert set(content) == set(AUDIO_CONTENT) == {f.media_type for f in FORMATS.values()}
    assert {"audio/mpeg", "audio/ogg; codecs=opus"} <= set(content)
    body = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]["format"]["enum"]) == set(FORMATS)


def test_mp3_bitrate_setting_sets_the_size(server, base_settings):
    """The server's default (192 kbit/s) and one at 64 kbit/s: each MP3 is its bitrate times its length, within the
    frame rounding and the tags."""
    sizes = {192: len(generate(server, "mp3").content)}
    low = LiveServer(base_settings.model_copy(update={"mp3_bitrate_kbps": 64, "warmup": False}))
    try:
        low_mp3 = generate(low, "mp3").content
        sizes[64] = len(low_mp3)
        assert generate(low, "wav").content == generate(server, "wav").content  # only the encoding differs
    finally:
        low.stop()
    for kbps, size in sizes.items():
        assert size == pytest.approx(kbps * 1000 / 8 * DURATION, rel=0.06), (kbps, size)
    audio, _ = sf.read(io.BytesIO(low_mp3), always_2d=True)
    assert audio.shape == (FRAMES, 2)


@pytest.mark.slow  # every bitrate encoded
def test_every_mp3_bitrate_is_what_lame_writes():
    """The compression level for each bitrate setting gives LAME exactly that constant bitrate (libsndfile maps the
    level onto LAME's range by truncation; an off-by-one would land on the neighbouring standard rate)."""
    import torch

    seconds = 4.0
    wave = 0.1 * torch.randn(2, int(seconds * SR), generator=torch.Generator().manual_seed(0))
    for kbps in MP3_BITRATES_KBPS:
        data, _ = encode_audio(wave, SR, "mp3", kbps)
        assert len(data) == pytest.approx(kbps * 1000 / 8 * seconds, rel=0.03), kbps
    assert mp3_compression_level(320, SR) == 0.0 and mp3_compression_level(32, SR) < 1.0


def test_the_bitrate_setting_takes_only_mp3_bitrates():
    assert Settings(_env_file=None, mp3_bitrate_kbps=128).mp3_bitrate_kbps == 128
    with pytest.raises(ValueError, match="not an MP3 bitrate"):
        Settings(_env_file=None, mp3_bitrate_kbps=100)
