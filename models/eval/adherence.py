"""Caption adherence: does generated audio do what its caption's ground truth says?

Per clip (:func:`evaluate_clip`): pitch error of pure tones (external CREPE tracker), stereo
placement, and tempo of click / beep trains.  :func:`summarize` aggregates a list of those.
"""
from __future__ import annotations

import numpy as np

from .pitch import to_mono

PLACEMENT_THRESHOLD_DB = 3.0
TEMPO_RANGE_BPM = (40.0, 200.0)
_EPS = 1e-12


def _stereo(audio: np.ndarray) -> np.ndarray:
    a = np.asarray(audio, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError("expected stereo audio [2, N]")
    if a.shape[0] != 2 and a.shape[1] == 2:
        a = a.T
    return a


def channel_balance_db(audio: np.ndarray) -> float:
    """10 log10(energy L / energy R); +inf-ish for left-only, 0 for silence."""
    a = _stereo(audio)
    el, er = float(np.sum(a[0] ** 2)), float(np.sum(a[1] ** 2))
    if el + er <= _EPS:
        return 0.0
    return float(10.0 * np.log10((el + _EPS) / (er + _EPS)))


def placement_matches(audio, placement: str | None, threshold_db: float = PLACEMENT_THRESHOLD_DB) -> bool | None:
    if placement is None:
        return None
    a = _stereo(audio)
    if placement in ("left", "right", "centre", "center"):
        b = channel_balance_db(a)
        if placement == "left":
            return bool(b > threshold_db)
        if placement == "right":
            return bool(b < -threshold_db)
        return bool(abs(b) < threshold_db)
    if placement in ("left-to-right", "right-to-left"):
        n = a.shape[1]
        third = n // 3
        if third == 0:
            return False
        first, last = channel_balance_db(a[:, :third]), channel_balance_db(a[:, n - third:])
        move = first - last          # > 0: balance went from left towards right
        return bool(move > threshold_db) if placement == "left-to-right" else bool(-move > threshold_db)
    raise ValueError(f"unknown placement {placement!r}")


def onset_strength(audio: np.ndarray, sample_rate: int, hop_seconds: float = 0.002) -> tuple[np.ndarray, float]:
    """Half-wave rectified derivative of log-compressed short-time energy; returns (envelope, frame rate)."""
    x = to_mono(audio)
    hop = max(1, int(round(hop_seconds * sample_rate)))
    n = len(x) // hop
    if n < 4:
        return np.zeros(0), sample_rate / hop
    e = (x[: n * hop] ** 2).reshape(n, hop).sum(1)
    # ~6 ms smoothing (3 frames) to suppress carrier ripple
    k = 3
    e = np.convolve(e, np.ones(k) / k, mode="same")
    peak = e.max()
    if peak <= 0:
        return np.zeros(n), sample_rate / hop
    logE = np.log1p(1000.0 * e / peak)
    nov = np.maximum(np.diff(logE, prepend=logE[0]), 0.0)
    return nov, sample_rate / hop


def _parabolic(y: np.ndarray, i: int) -> float:
    if 0 < i < len(y) - 1:
        a, b, c = y[i - 1], y[i], y[i + 1]
        d = a - 2 * b + c
        if d < 0:
            return i + 0.5 * (a - c) / d
    return float(i)


def estimate_tempo(audio, sample_rate: int, bpm_range: tuple = TEMPO_RANGE_BPM) -> float | None:
    """Tempo (BPM) of a periodic click / beep train, or None when no periodicity is found.

    Autocorrelation of the onset-strength envelope (unbiased); the *shortest* lag in range whose
    correlation is within 75 % of the best one is taken (avoids picking a multiple of the period),
    then refined with the furthest clear multiple of that lag.
    """
    nov, fr = onset_strength(audio, sample_rate)
    if len(nov) < 8 or not np.any(nov > 0):
        return None
    # blur onsets over ~20 ms so that a period that is not a whole number of frames still gives
    # one clean autocorrelation peak (not two half-height ones)
    w = np.hanning(11)
    nov = np.convolve(nov, w / w.sum(), mode="same")
    nov = nov - nov.mean()
    n = len(nov)
    m = 1
    while m < 2 * n:
        m *= 2
    spec = np.fft.rfft(nov, m)
    ac = np.fft.irfft(spec * np.conj(spec), m)[:n]
    ac = ac / (n - np.arange(n))           # unbiased
    if ac[0] <= 0:
        return None
    ac = ac / ac[0]
    lag_min = int(np.floor(fr * 60.0 / bpm_range[1] * 0.97))
    lag_max = int(np.ceil(fr * 60.0 / bpm_range[0] * 1.03))
    lag_max = min(lag_max, int(n * 0.75))   # need >= ~1.3 periods of overlap
    if lag_max <= lag_min + 2:
        return None
    seg = ac[lag_min:lag_max + 1]
    peaks = [i for i in range(1, len(seg) - 1) if seg[i] >= seg[i - 1] and seg[i] > seg[i + 1]]
    if not peaks:
        return None
    best = max(seg[i] for i in peaks)
    if best < 0.1:
        return None
    i0 = min(i for i in peaks if seg[i] >= 0.75 * best)
    lag = lag_min + _parabolic(seg, i0)
    # refine with multiples of the lag (each within +-4 %) while they stay clear peaks
    k = 2
    while True:
        centre = k * lag
        lo, hi = int(np.floor(centre * 0.96)), int(np.ceil(centre * 1.04))
        if hi >= int(n * 0.75) or hi >= n - 1:
            break
        j = lo + int(np.argmax(ac[lo:hi + 1]))
        if ac[j] < 0.5 * best:
            break
        lag = _parabolic(ac, j) / k
        k += 1
    bpm = 60.0 * fr / lag
    return float(bpm)


def pitch_error(audio, sample_rate: int, target_hz: float, tracker) -> float | None:
    f = tracker.median_pitch(audio, sample_rate)
    if f is None:
        return None
    return float(abs(f - target_hz) / target_hz)


def evaluate_clip(audio, sample_rate: int, params: dict, tracker=None) -> dict:
    cat = params.get("category")
    out: dict = {"category": cat, "pitch_error": None, "measured_pitch_hz": None,
                 "placement": params.get("placement"), "placement_ok": None,
                 "balance_db": None, "tempo_error": None, "measured_bpm": None}
    if cat == "tone" and tracker is not None:
        f = tracker.median_pitch(audio, sample_rate)
        out["measured_pitch_hz"] = f
        out["target_pitch_hz"] = params["pitch_hz"]
        out["pitch_error"] = None if f is None else float(abs(f - params["pitch_hz"]) / params["pitch_hz"])
        out["is_tone"] = True
    if params.get("placement") is not None:
        out["placement_ok"] = placement_matches(audio, params["placement"])
        out["balance_db"] = channel_balance_db(audio)
    if cat == "clicks":
        bpm = estimate_tempo(audio, sample_rate)
        out["measured_bpm"] = bpm
        out["target_bpm"] = params["bpm"]
        out["tempo_error"] = None if bpm is None else float(abs(bpm - params["bpm"]) / params["bpm"])
        out["is_rhythmic"] = True
    return out


def summarize(results: list[dict], pitch_tol: float = 0.03, tempo_tol: float = 0.05) -> dict:
    """Aggregate :func:`evaluate_clip` results; unmeasurable clips (None) count as misses."""
    tones = [r for r in results if r.get("is_tone")]
    errs = [r["pitch_error"] for r in tones if r.get("pitch_error") is not None]
    placed = [r for r in results if r.get("placement_ok") is not None]
    rhythmic = [r for r in results if r.get("is_rhythmic")]
    terrs = [r["tempo_error"] for r in rhythmic if r.get("tempo_error") is not None]
    return {
        "n": len(results),
        "n_tone": len(tones),
        "n_tone_unpitched": len(tones) - len(errs),
        "pitch_error_median": float(np.median(errs)) if errs else None,
        "pitch_within_3pct": (sum(e <= pitch_tol for e in errs) / len(tones)) if tones else None,
        "n_placed": len(placed),
        "placement_accuracy": (sum(bool(r["placement_ok"]) for r in placed) / len(placed)) if placed else None,
        "n_rhythmic": len(rhythmic),
        "tempo_error_median": float(np.median(terrs)) if terrs else None,
        "tempo_within_5pct": (sum(e <= tempo_tol for e in terrs) / len(rhythmic)) if rhythmic else None,
    }
