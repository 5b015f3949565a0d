"""The generation modes over HTTP: init audio as base64 JSON or a multipart file (any rate and channel count),
audio-to-audio, inpainting, negative prompts, what /models says, and a clear 422 / 413 for every bad input."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import soundfile as sf
import torch

from service_support import LiveServer

SR = 44100


def clip_bytes(seconds: float = 1.0, rate: int = 22050, channels: int = 1, fmt: str = "WAV",
               freq: float = 440.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * freq * t)
    data = np.stack([tone * (1 + 0.1 * c) for c in range(channels)], axis=1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, data, rate, format=fmt, subtype="PCM_16" if fmt != "OGG" else "VORBIS")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pcm(content: bytes) -> np.ndarray:
    return sf.read(io.BytesIO(content), dtype="int16", always_2d=True)[0]


def test_models_list_their_modes(server):
    with server.client() as c:
        models = {m["name"]: m for m in c.get("/models").json()}
    assert models["tiny"]["modes"] == ["text-to-audio", "audio-to-audio", "inpainting", "negative-prompt"]


def test_audio_to_audio_as_json_and_as_a_multipart_form_give_the_same_audio(server):
    clip = clip_bytes(rate=22050, channels=1)
    fields = {"prompt": "a bell rings", "duration": 1.0, "steps": 3, "seed": 5, "init_noise_level": 0.5}
    with server.client() as c:
        as_json = c.post("/generate", json={**fields, "init_audio": b64(clip)})
        as_form = c.post("/generate", data={k: str(v) for k, v in fields.items()},
                         files={"init_audio": ("clip.wav", clip, "audio/wav")})
        plain = c.post("/generate", json={k: v for k, v in fields.items() if k != "init_noise_level"})
    for r in (as_json, as_form, plain):
        assert r.status_code == 200, r.text
        assert pcm(r.content).shape == (SR, 2)
    assert np.array_equal(pcm(as_json.content), pcm(as_form.content))
    assert not np.array_equal(pcm(as_json.content), pcm(plain.content))  # it started from the clip


def test_inpainting_and_a_negative_prompt_over_http(server):
    clip = clip_bytes(seconds=1.5, rate=48000, channels=2, fmt="FLAC")
    with server.client() as c:
        inpaint = c.post("/generate", json={"prompt": "thunder", "duration": 1.5, "steps": 3, "seed": 1,
                                            "init_audio": b64(clip), "inpaint_start": 0.5, "inpaint_end": 1.0})
        outpaint = c.post("/generate", json={"prompt": "thunder", "duration": 2.5, "steps": 3, "seed": 1,
                                             "init_audio": b64(clip), "inpaint_start": 1.5, "inpaint_end": 2.5})
        negative = c.post("/generate", json={"prompt": "thunder", "duration": 1.0, "steps": 3, "seed": 1,
                                             "guidance": 3.0, "negative_prompt": "a siren"})
    assert inpaint.status_code == outpaint.status_code == negative.status_code == 200
    assert pcm(outpaint.content).shape == (round(2.5 * SR), 2)


@pytest.mark.parametrize("body, status, field, words", [
    ({"init_audio": b64(b"RIFF not audio at all")}, 422, "init_audio", "not a readable"),
    ({"init_audio": "%%% not base64"}, 422, "init_audio", "base64"),
    ({"init_audio": b64(clip_bytes()), "init_noise_level": 0}, 422, "init_noise_level", "greater than 0"),
    ({"init_audio": b64(clip_bytes()), "init_noise_level": 1.5}, 422, "init_noise_level", "less than or equal"),
    ({"init_noise_level": 0.5}, 422, "init_noise_level", "needs init_audio"),
    ({"init_audio": b64(clip_bytes()), "inpaint_start": 0.6, "inpaint_end": 0.4}, 422, "inpaint_end", "after"),
    ({"init_audio": b64(clip_bytes()), "inpaint_start": 0.6}, 422, "inpaint_end", "come together"),
    ({"init_audio": b64(clip_bytes()), "inpaint_start": 0.5, "inpaint_end": 3.0}, 422, "inpaint_end",
     "after the clip's 1.0 s"),
    ({"inpaint_start": 0.1, "inpaint_end": 0.5}, 422, "init_audio", "needs init_audio"),
    ({"negative_prompt": "noise", "guidance": 1.0}, 422, "negative_prompt", "guidance other than 1"),
    ({"negative_prompt": "x" * 501}, 422, "negative_prompt", "at most 500"),
])
def test_bad_mode_input_is_a_clear_error(server, body, status, field, words):
    with server.client() as c:
        r = c.post("/generate", json={"prompt": "a bell", "duration": 1.0, "steps": 2, **body})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_input" and err["field"] == field and words in err["message"], err
    assert " object at 0x" not in err["message"], err  # no reprs of the server's objects


def test_bad_forms_and_uploads(base_settings):
    srv = LiveServer(base_settings.model_copy(update={"max_upload_bytes": 64 * 1024, "warmup": False}))
    try:
        with srv.client() as c:
            big = clip_bytes(seconds=2.0, rate=44100, channels=2)  # 350 kB of WAV
            r = c.post("/generate", data={"prompt": "x"}, files={"init_audio": ("big.wav", big, "audio/wav")})
            assert r.status_code == 413 and "audio clip" in r.json()["error"]["message"]
            r = c.post("/generate", json={"prompt": "x", "init_audio": b64(big)})
            assert r.status_code == 413
            r = c.post("/generate", data={"prompt": "x"}, files={"other": ("a.wav", clip_bytes(), "audio/wav")})
            assert r.status_code == 422 and r.json()["error"]["field"] == "other"
            r = c.post("/generate", data={"prompt": "x", "steps": "many"})
            assert r.status_code == 422 and r.json()["error"]["field"] == "steps"
            r = c.post("/generate", data={"prompt": "x", "init_noise_level": "0.5"},
                       files={"init_audio": ("c.ogg", clip_bytes(fmt="OGG"), "audio/ogg")})
            assert r.status_code == 200, r.text  # Ogg Vorbis in, any rate
            assert c.post("/generate", json={"prompt": "x" * 600}).status_code == 422
    finally:
        srv.stop()


def test_openapi_documents_both_request_forms(server):
    with server.client() as c:
        body = c.get("/openapi.json").json()["paths"]["/generate"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert body["multipart/form-data"]["schema"]["properties"]["init_audio"]["format"] == "binary"
    assert "inpaint_start" in body["application/json"]["schema"]["properties"]


def test_uploaded_clips_are_resampled_band_limited_and_made_stereo():
    from service.audio import decode_audio

    wave = decode_audio(clip_bytes(seconds=1.0, rate=22050, channels=1, freq=1000.0), SR, max_seconds=10)
    assert wave.shape == (2, SR) and torch.equal(wave[0], wave[1])
    spectrum = np.abs(np.fft.rfft(wave[0].numpy()))
    assert abs(np.argmax(spectrum) * SR / wave.shape[1] - 1000.0) < 2  # the pitch survives
    assert spectrum[int(11025 * wave.shape[1] / SR) + 50:].max() < 1e-3 * spectrum.max()  # no images above 11 kHz
    six = decode_audio(clip_bytes(seconds=0.5, rate=SR, channels=6), SR, max_seconds=0.25)
    assert six.shape == (2, round(0.25 * SR)) and not torch.equal(six[0], six[1])  # front left and right, cut
