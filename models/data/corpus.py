"""A deterministic synthetic corpus of captioned 44.1 kHz stereo sound clips.

Every clip is a pure function of ``(seed, split, index)``: :meth:`SyntheticCorpus.sample_params`
draws a JSON-serialisable ground-truth dict, :func:`render` turns that dict into audio (bit-for-bit
reproducible) and :meth:`SyntheticCorpus.caption` writes a caption for it from the split's templates.

Splits
------
``train`` / ``val``
    Training templates and training parameter values (``val`` is just another random stream).
``heldout``
    Only held-out templates (wrappers, source phrasings and modifier phrasings that the training
    templates never produce) and, for the values that captions state, only held-out values:
    :data:`HELDOUT_PITCHES_HZ` and :data:`HELDOUT_BPMS`. The training split never samples a pitch
    within 1.5 % of a held-out pitch nor a tempo within 2 % of a held-out tempo.

Categories (approximate probabilities): tone 30 %, clicks 15 %, impact 9 %, texture 13 %,
noise 8 %, sweep 7 %, siren 6 %, mixture of two 12 %.  Placement (left / right / centre / moving)
and loudness envelope (fade in / out, getting louder / quieter, short burst) are modifiers on top.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from scipy import fft as sfft
from scipy import signal as ssig

SAMPLE_RATE = 44100

SPLITS = {"train": 0, "val": 1, "heldout": 2}

CATEGORIES = ("tone", "clicks", "impact", "texture", "noise", "sweep", "siren", "mixture")
CATEGORY_PROBS = (0.30, 0.15, 0.09, 0.13, 0.08, 0.07, 0.06, 0.12)
PART_CATEGORIES = ("tone", "clicks", "impact", "texture", "noise", "sweep", "siren")
PART_PROBS = (0.28, 0.14, 0.12, 0.22, 0.10, 0.07, 0.07)

WAVEFORMS = ("sine", "square", "sawtooth", "triangle")
NOISE_COLOURS = ("white", "pink", "brown")
IMPACT_KINDS = ("knock", "kick", "clap")
TEXTURE_KINDS = ("rain", "wind", "waves", "engine", "birds", "phone", "alarm")
PLACEMENTS = ("left", "right", "centre", "left-to-right", "right-to-left")
ENVELOPES = ("fade in", "fade out", "getting louder", "getting quieter", "short burst")

PITCH_RANGE_HZ = (80.0, 2000.0)
BPM_RANGE = (40, 200)
PITCH_HOLDOUT_TOL = 0.015
BPM_HOLDOUT_TOL = 0.02

# Held-out pitches: quarter-tones (half-way between equal-tempered notes, so ~2.9 % from any note
# name the training captions can use), rounded to whole Hz.
_HELDOUT_MIDI = (41, 43, 46, 48, 51, 53, 56, 58, 61, 63, 66, 68, 71, 73, 76, 79, 82, 85, 88, 91)
HELDOUT_PITCHES_HZ: tuple[int, ...] = tuple(
    int(round(440.0 * 2.0 ** ((m + 0.5 - 69) / 12.0))) for m in _HELDOUT_MIDI)
HELDOUT_BPMS: tuple[int, ...] = (47, 58, 67, 77, 93, 107, 127, 143, 163, 187)

_NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
_FLAT_NAMES = {"C#": "Db", "D#": "Eb", "F#": "Gb", "G#": "Ab", "A#": "Bb"}
_COMMON_HZ = (100, 110, 150, 200, 220, 250, 300, 330, 400, 440, 500, 600, 700, 800, 880, 1000,
              1200, 1500, 2000)
_COMMON_BPM = (60, 70, 80, 90, 100, 110, 120, 128, 140, 150, 160, 180, 200)


def midi_to_hz(m: float) -> float:
    return 440.0 * 2.0 ** ((m - 69) / 12.0)


def note_name(midi: int, flat: bool = False) -> str:
    name = _NOTE_NAMES[midi % 12]
    if flat and name in _FLAT_NAMES:
        name = _FLAT_NAMES[name]
    return f"{name}{midi // 12 - 1}"


def near_heldout_pitch(hz: float, tol: float = PITCH_HOLDOUT_TOL) -> bool:
    return any(abs(hz - h) / h < tol for h in HELDOUT_PITCHES_HZ)


def near_heldout_bpm(bpm: float, tol: float = BPM_HOLDOUT_TOL) -> bool:
    return any(abs(bpm - h) / h < tol for h in HELDOUT_BPMS)


# Notes whose frequency lies in the pitch range (E2 .. B6); none is near a held-out pitch.
TRAIN_NOTES: tuple[int, ...] = tuple(
    m for m in range(20, 110)
    if PITCH_RANGE_HZ[0] <= midi_to_hz(m) <= PITCH_RANGE_HZ[1] and not near_heldout_pitch(midi_to_hz(m)))


@dataclass
class Clip:
    caption: str
    audio: np.ndarray      # float32 [2, N]
    duration: float        # seconds
    params: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Caption templates.  Train and held-out sets share no wrapper, source phrasing or modifier
# phrasing; every held-out wrapper carries a marker phrase that no train template contains.
# ----------------------------------------------------------------------------------------------
TEMPLATES: dict[str, dict] = {
    "train": {
        "wrapper": ["{s}{m}", "{s}{m}", "{s}{m}", "the sound of {s}{m}", "{s}{m}, isolated",
                    "a recording of {s}{m}", "a short clip of {s}{m}", "sound effect: {s}{m}",
                    "{s}{m}, recorded cleanly"],
        "tone": ["a {pitch} {wave} {word}", "a {wave} {word} at {pitch}", "{pitch} {wave} wave",
                 "a {wave} wave {word} of {pitch}", "a steady {pitch} {wave} {word}",
                 "a {word} at a frequency of {pitch} with a {wave} waveform", "a {wave} oscillator playing {pitch}",
                 "{pitch}, {wave} waveform", "a {wave} {word} with a frequency of {pitch}"],
        "tone_nowave": ["a {pitch} {word}", "a {word} at {pitch}", "a pure {word} of {pitch}",
                        "a {word} with a frequency of {pitch}", "a {word} playing at {pitch}"],
        "tone_word": ["tone", "note", "beep", "tone", "oscillator tone"],
        "wave": {"sine": ["sine", "sine", "pure sine", "sinusoidal"], "square": ["square", "square-wave"],
                 "sawtooth": ["sawtooth", "saw"], "triangle": ["triangle", "triangular"]},
        "clicks": ["{sound}s at {bpm} BPM", "{sound}s at {bpm} beats per minute",
                   "a metronome {sound} at {bpm} BPM", "a {sound} repeating at {bpm} bpm",
                   "regular {sound}s, {bpm} BPM", "a {sound} track at {bpm} beats per minute",
                   "a steady {sound} at {bpm} beats per minute", "a {sound} ticking along at {bpm} BPM",
                   "{sound}s spaced at {bpm} BPM"],
        "click_word": {"click": ["click", "tick"], "beep": ["beep", "bleep"]},
        "noise": {"white": ["white noise", "white noise hiss", "static white noise"],
                  "pink": ["pink noise", "soft pink noise"],
                  "brown": ["brown noise", "brownian noise", "deep brown noise"]},
        "sweep": {"rising": ["a rising sweep", "an upward frequency sweep", "a rising tone sweep",
                             "a sweep going up"],
                  "falling": ["a falling sweep", "a downward frequency sweep", "a falling tone sweep",
                              "a sweep going down"]},
        "siren": {"wail": ["a siren", "a wailing siren", "an emergency siren"],
                  "hilo": ["a two-tone siren", "a hi-lo siren", "a police siren"]},
        "impact": {"knock": (["a knock", "a single knock", "a knock on a door"],
                             ["{n} knocks", "{n} knocks on a door"]),
                   "kick": (["a kick drum hit", "a single kick drum", "a bass drum hit"],
                            ["{n} kick drum hits", "{n} kicks on a bass drum"]),
                   "clap": (["a hand clap", "a single clap", "one hand clap"],
                            ["{n} hand claps", "{n} claps"])},
        "texture": {"rain": ["rain", "rainfall", "steady rain", "rain falling"],
                    "wind": ["wind", "wind blowing", "gusty wind"],
                    "waves": ["ocean waves", "waves on a beach", "sea waves"],
                    "engine": ["an engine hum", "a humming engine", "an idling engine"],
                    "birds": ["bird-like chirps", "birds chirping", "chirping birds"],
                    "phone": ["a phone ringing", "a ringing telephone", "a phone ring"],
                    "alarm": ["an alarm", "an alarm beeping", "a beeping alarm"]},
        "mixture": ["{a} and {b}", "{a} together with {b}", "{a} plus {b}", "{a}, and {b}"],
        "placement": {"left": ["on the left", "in the left channel", "panned left", "hard left",
                               "on the left side", "from the left", "left-panned", "in the left ear"],
                      "right": ["on the right", "in the right channel", "panned right", "hard right",
                                "on the right side", "from the right", "right-panned", "in the right ear"],
                      "centre": ["in the centre", "centered", "in the center", "panned to the centre",
                                 "equally loud in both channels", "panned centre"],
                      "left-to-right": ["moving left to right", "panning from left to right",
                                        "moving from left to right", "sweeping from left to right",
                                        "travelling from the left side to the right side"],
                      "right-to-left": ["moving right to left", "panning from right to left",
                                        "moving from right to left", "sweeping from right to left",
                                        "travelling from the right side to the left side"]},
        "envelope": {"fade in": ["fading in", "with a fade in", "that fades in", "with a slow fade in"],
                     "fade out": ["fading out", "with a fade out", "that fades out", "fading away"],
                     "getting louder": ["getting louder", "growing louder", "increasing in volume",
                                        "building up in volume"],
                     "getting quieter": ["getting quieter", "growing quieter", "decreasing in volume",
                                         "dying down"],
                     "short burst": ["in a short burst", "as a short burst", "briefly", "for a split second"]},
        "mod_join": [" ", ", "],
    },
    "heldout": {
        "wrapper": ["we hear {s}{m}", "audio clip featuring {s}{m}", "listen: {s}{m}",
                    "{s}{m}; nothing else is audible"],
        "tone": ["a {wave}-shaped {word} pitched at {pitch}", "a {wave} {word} whose pitch is {pitch}",
                 "a {word} with {wave} timbre sustained at {pitch}"],
        "tone_nowave": ["a {word} held at exactly {pitch}", "one {word} whose frequency is {pitch}"],
        "tone_word": ["tone", "sound", "signal"],
        "wave": {"sine": ["sine"], "square": ["square"], "sawtooth": ["sawtooth"], "triangle": ["triangle"]},
        "clicks": ["a pulse of {sound}s with a tempo of {bpm} BPM", "{bpm} BPM {sound} pulses",
                   "a {sound} pattern whose tempo is {bpm} beats per minute"],
        "click_word": {"click": ["click"], "beep": ["beep"]},
        "noise": {"white": ["broadband white-noise static"], "pink": ["a wash of pink-coloured noise"],
                  "brown": ["low rumbling brown-coloured noise"]},
        "sweep": {"rising": ["a tone gliding upwards in pitch"], "falling": ["a tone gliding downwards in pitch"]},
        "siren": {"wail": ["an ambulance siren wailing up and down"],
                  "hilo": ["a siren alternating between two pitches"]},
        "impact": {"knock": (["one knuckle rap on wood"], ["{n} knuckle raps on wood"]),
                   "kick": (["one thump of a kick drum"], ["{n} kick drum thumps"]),
                   "clap": (["one sharp handclap"], ["{n} sharp handclaps"])},
        "texture": {"rain": ["a downpour of rain drops"], "wind": ["a howling gale"],
                    "waves": ["surf crashing on the shore"], "engine": ["the drone of a motor"],
                    "birds": ["little birds tweeting"], "phone": ["a telephone that keeps ringing"],
                    "alarm": ["a warning alarm sounding"]},
        "mixture": ["{a} layered over {b}", "{a} alongside {b}"],
        "placement": {"left": ["coming from the left speaker", "off to the left"],
                      "right": ["coming from the right speaker", "off to the right"],
                      "centre": ["right in the middle of the stereo image", "dead centre"],
                      "left-to-right": ["drifting across from the left speaker to the right one"],
                      "right-to-left": ["drifting across from the right speaker to the left one"]},
        "envelope": {"fade in": ["slowly swelling in from silence"], "fade out": ["trailing off into silence"],
                     "getting louder": ["steadily rising in loudness"],
                     "getting quieter": ["steadily dropping in loudness"],
                     "short burst": ["for just a brief moment"]},
        "mod_join": [", "],
    },
}
TEMPLATES["val"] = TEMPLATES["train"]

_NUM_WORDS = {2: "two", 3: "three", 4: "four"}


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _an(word: str) -> bool:
    w = word.strip()
    if not w:
        return False
    if w[0].isdigit():
        digits = re.match(r"\d+", w).group(0)
        return digits[0] == "8" or (len(digits) in (2, 4) and digits[:2] in ("11", "18"))
    if re.match(r"^[A-G](#|b)?-?\d", w):          # note names: A4, E3, F#3
        return w[0] in "AEF"
    return w[0].lower() in "aeiou" and not w.lower().startswith(("one", "uni", "use"))


def fix_articles(text: str) -> str:
    def repl(m):
        art, word = m.group(1), m.group(2)
        want = "an" if _an(word) else "a"
        if art[0].isupper():
            want = want.capitalize()
        return f"{want} {word}"
    return re.sub(r"\b([Aa]n?) ([\w#-]+)", repl, text)


# ----------------------------------------------------------------------------------------------
# The corpus
# ----------------------------------------------------------------------------------------------
class SyntheticCorpus:
    def __init__(self, split: str = "train", seed: int = 0, min_duration: float = 1.0,
                 max_duration: float = 10.0):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
        if not (0 < min_duration <= max_duration):
            raise ValueError("need 0 < min_duration <= max_duration")
        self.split = split
        self.seed = int(seed)
        self.min_duration = float(min_duration)
        self.max_duration = float(max_duration)
        self.heldout = split == "heldout"

    def __len__(self) -> int:  # nominal size; any index >= 0 is valid
        return 1_000_000

    def rng_for(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS[self.split], int(index), 0x5EED])

    def __getitem__(self, index: int) -> Clip:
        if index < 0:
            raise IndexError("index must be >= 0")
        rng = self.rng_for(index)
        params = self.sample_params(rng)
        caption = self.caption(params, rng)
        audio = render(params)
        return Clip(caption=caption, audio=audio, duration=params["duration"], params=params)

    # -- parameters -------------------------------------------------------------------------
    def _pitch(self, rng) -> tuple[float, str]:
        if self.heldout:
            hz = _pick(rng, HELDOUT_PITCHES_HZ)
            return float(hz), f"{hz} Hz"
        u = rng.random()
        if u < 0.45:  # a note name
            m = _pick(rng, TRAIN_NOTES)
            if m == 60 and rng.random() < 0.5:
                text = "middle C"
            else:
                text = note_name(m, flat=bool(rng.random() < 0.25))
            return midi_to_hz(m), text
        if u < 0.65:
            cands = [h for h in _COMMON_HZ if not near_heldout_pitch(h)]
            hz = _pick(rng, cands)
        else:
            hz = self._whole_hz(rng, *PITCH_RANGE_HZ)
        return float(hz), self._hz_text(hz, rng)

    def _whole_hz(self, rng, lo_hz: float, hi_hz: float, tries: int | None = None,
                  pitch_range: tuple[float, float] = PITCH_RANGE_HZ) -> int | None:
        """A whole-Hz pitch drawn log-uniformly from [lo_hz, hi_hz], drawn again while it rounds outside
        ``pitch_range`` or, in the training split, lies near a held-out pitch; None after ``tries`` such draws (None:
        no limit)."""
        lo, hi = np.log(lo_hz), np.log(hi_hz)
        drawn = 0
        while tries is None or drawn < tries:
            hz = int(round(float(np.exp(rng.uniform(lo, hi)))))
            if pitch_range[0] <= hz <= pitch_range[1] and (self.heldout or not near_heldout_pitch(hz)):
                return hz
            drawn += 1
        return None

    def transposed_params(self, params: dict, rng, lo_hz: float, hi_hz: float, tries: int = 20,
                          pitch_range: tuple[float, float] = PITCH_RANGE_HZ) -> dict | None:
        """A tone's ground truth moved to a whole-Hz pitch drawn log-uniformly from [lo_hz, hi_hz] within
        ``pitch_range`` (the corpus' own by default; a trainer may widen it, see ``models.training.augment``), stated
        in Hz; in the training split never near a held-out pitch. None when no such pitch was drawn (the range lies
        outside the pitch range, or only near held-out values)."""
        if params.get("category") != "tone":
            raise ValueError("only a tone's pitch can be moved")
        lo, hi = max(lo_hz, pitch_range[0]), min(hi_hz, pitch_range[1])
        if lo > hi:
            return None
        hz = self._whole_hz(rng, lo, hi, tries, pitch_range)
        if hz is None:
            return None
        return {**params, "pitch_hz": float(hz), "pitch_text": self._hz_text(hz, rng)}

    @staticmethod
    def _hz_text(hz: int, rng) -> str:
        return f"{hz}{_pick(rng, (' Hz', ' Hz', ' Hz', 'Hz', ' hertz'))}"

    def _bpm(self, rng) -> int:
        if self.heldout:
            return int(_pick(rng, HELDOUT_BPMS))
        if rng.random() < 0.3:
            return int(_pick(rng, [b for b in _COMMON_BPM if not near_heldout_bpm(b)]))
        while True:
            b = int(rng.integers(BPM_RANGE[0], BPM_RANGE[1] + 1))
            if not near_heldout_bpm(b):
                return b

    def _source(self, category: str, rng, duration: float) -> dict:
        p: dict = {"category": category, "seed": int(rng.integers(2**31 - 1))}
        if category == "tone":
            p["waveform"] = _pick(rng, WAVEFORMS) if rng.random() < 0.85 else "sine"
            p["waveform_stated"] = bool(p["waveform"] != "sine" or rng.random() < 0.75)
            p["pitch_hz"], p["pitch_text"] = self._pitch(rng)
        elif category == "clicks":
            p["sound"] = _pick(rng, ("click", "beep"))
            p["bpm"] = self._bpm(rng)
            p["onset_s"] = float(round(rng.uniform(0.0, 0.1), 4))
            p["sound_hz"] = float(round(rng.uniform(2000, 4000) if p["sound"] == "click"
                                        else rng.uniform(500, 1500), 1))
            p["sound_len_s"] = float(round(rng.uniform(0.004, 0.012) if p["sound"] == "click"
                                           else rng.uniform(0.05, 0.1), 4))
        elif category == "noise":
            p["colour"] = _pick(rng, NOISE_COLOURS)
        elif category == "sweep":
            p["direction"] = _pick(rng, ("rising", "falling"))
            lo = float(np.exp(rng.uniform(np.log(80), np.log(400))))
            hi = float(lo * np.exp(rng.uniform(np.log(3), np.log(20))))
            hi = min(hi, 8000.0)
            p["f_start_hz"], p["f_end_hz"] = (lo, hi) if p["direction"] == "rising" else (hi, lo)
            p["waveform"] = _pick(rng, ("sine", "sine", "triangle", "sawtooth"))
        elif category == "siren":
            p["kind"] = _pick(rng, ("wail", "hilo"))
            p["low_hz"] = float(rng.uniform(450, 750))
            p["high_hz"] = float(p["low_hz"] * rng.uniform(1.3, 2.0))
            p["rate_hz"] = float(rng.uniform(0.2, 0.6) if p["kind"] == "wail" else rng.uniform(0.7, 1.2))
            p["waveform"] = _pick(rng, ("sine", "triangle", "sawtooth"))
        elif category == "impact":
            p["kind"] = _pick(rng, IMPACT_KINDS)
            p["n_hits"] = 1 if rng.random() < 0.5 else int(rng.integers(2, 5))
            p["first_hit_s"] = float(round(rng.uniform(0.02, 0.2), 4))
            p["hit_interval_s"] = float(round(rng.uniform(0.25, 0.6), 4))
        elif category == "texture":
            p["kind"] = _pick(rng, TEXTURE_KINDS)
        else:
            raise ValueError(category)
        return p

    def _duration(self, rng, category: str) -> float:
        lo, hi = self.min_duration, self.max_duration
        return float(round(rng.uniform(lo, hi), 2))

    def sample_params(self, rng: np.random.Generator) -> dict:
        category = CATEGORIES[int(rng.choice(len(CATEGORIES), p=CATEGORY_PROBS))]
        duration = self._duration(rng, category)
        if category == "mixture":
            cats = rng.choice(len(PART_CATEGORIES), size=2, replace=False, p=PART_PROBS)
            parts = []
            for c in cats:
                part = self._source(PART_CATEGORIES[int(c)], rng, duration)
                part["gain_db"] = float(round(rng.uniform(-6.0, 0.0), 2))
                part["duration"] = duration
                part["placement"] = None
                parts.append(part)
            p = {"category": "mixture", "parts": parts, "seed": int(rng.integers(2**31 - 1))}
        else:
            p = self._source(category, rng, duration)

        cats = {category} | {q["category"] for q in p.get("parts", [])}
        if "clicks" in cats:   # enough beats to hear (and measure) the tempo
            bpm = max(q["bpm"] for q in ([p] + p.get("parts", [])) if "bpm" in q)
            duration = max(duration, min(self.max_duration, round(4.5 * 60.0 / bpm + 0.2, 2)))
        if "impact" in cats:
            for q in [p] + p.get("parts", []):
                if q["category"] == "impact":
                    need = q["first_hit_s"] + (q["n_hits"] - 1) * q["hit_interval_s"] + 0.4
                    if need > self.max_duration:
                        q["n_hits"] = 1
                        need = q["first_hit_s"] + 0.4
                    duration = max(duration, min(self.max_duration, round(need, 2)))
        p["duration"] = float(duration)
        for q in p.get("parts", []):
            q["duration"] = float(duration)

        # --- envelope modifier -------------------------------------------------------------
        envelope = None
        if category != "impact" and rng.random() < 0.35:
            allowed = [e for e in ENVELOPES if not (e == "short burst" and "clicks" in cats)]
            envelope = _pick(rng, allowed)
        p["envelope"] = envelope
        if envelope in ("fade in", "fade out"):
            p["envelope_frac"] = float(round(rng.uniform(0.4, 0.8), 3))
        elif envelope == "short burst":
            blen = float(round(rng.uniform(0.2, min(0.6, 0.5 * duration)), 3))
            p["burst_start_s"] = float(round(rng.uniform(0.0, max(0.0, min(1.0, duration - blen - 0.05))), 3))
            p["burst_len_s"] = blen
        elif envelope in ("getting louder", "getting quieter"):
            p["envelope_range_db"] = float(round(rng.uniform(18.0, 30.0), 2))

        # --- placement modifier -----------------------------------------------------------
        placement = None
        if rng.random() < 0.5:
            placement = self._draw_placement(rng, p)
        p["placement"] = placement
        p.update(self._pan(placement, rng))

        p["gain_db"] = float(round(rng.uniform(-12.0, -3.0), 2))
        return p

    @staticmethod
    def _draw_placement(rng, p: dict) -> str:
        """One of the stereo placements a clip with these params may have (a moving one needs a sustained sound)."""
        movable = (p.get("envelope") != "short burst" and p["category"] != "impact"
                   and p.get("kind") not in ("birds", "phone") and p["duration"] >= 1.5)
        choices = ["left", "right", "centre"] + (["left-to-right", "right-to-left"] if movable else [])
        weights = np.array([3, 3, 2, 1, 1][: len(choices)], dtype=float)
        return choices[int(rng.choice(len(choices), p=weights / weights.sum()))]

    @staticmethod
    def _pan(placement: str | None, rng) -> dict:
        """The pan of a placement in dB of left over right energy (``pan_db``, or ``pan_start_db`` / ``pan_end_db``
        for a move); an unplaced clip is centred or nearly so."""
        if placement is None:
            return {"pan_db": 0.0 if rng.random() < 0.5 else float(round(rng.uniform(-3.0, 3.0), 2))}
        if placement == "centre":
            return {"pan_db": 0.0}
        if placement in ("left", "right"):
            b = float(round(rng.uniform(12.0, 30.0), 2))
            return {"pan_db": b if placement == "left" else -b}
        b = float(round(rng.uniform(15.0, 25.0), 2))
        return dict(zip(("pan_start_db", "pan_end_db"), (b, -b) if placement == "left-to-right" else (-b, b)))

    def replaced_params(self, params: dict, rng) -> dict:
        """A clip's ground truth with a freshly drawn stated placement and its pan (what re-panning the clip gives)."""
        placement = self._draw_placement(rng, params)
        rest = {k: v for k, v in params.items() if k not in ("placement", "pan_db", "pan_start_db", "pan_end_db")}
        return {**rest, "placement": placement, **self._pan(placement, rng)}

    # -- captions ---------------------------------------------------------------------------
    def _source_caption(self, p: dict, rng) -> str:
        T = TEMPLATES[self.split]
        c = p["category"]
        if c == "tone":
            word = _pick(rng, T["tone_word"])
            if p.get("waveform_stated", True):
                return _pick(rng, T["tone"]).format(pitch=p["pitch_text"], wave=_pick(rng, T["wave"][p["waveform"]]),
                                                    word=word)
            return _pick(rng, T["tone_nowave"]).format(pitch=p["pitch_text"], word=word)
        if c == "clicks":
            return _pick(rng, T["clicks"]).format(sound=_pick(rng, T["click_word"][p["sound"]]), bpm=p["bpm"])
        if c == "noise":
            return _pick(rng, T["noise"][p["colour"]])
        if c == "sweep":
            return _pick(rng, T["sweep"][p["direction"]])
        if c == "siren":
            return _pick(rng, T["siren"][p["kind"]])
        if c == "impact":
            single, multi = T["impact"][p["kind"]]
            if p["n_hits"] == 1:
                return _pick(rng, single)
            return _pick(rng, multi).format(n=_NUM_WORDS[p["n_hits"]])
        if c == "texture":
            return _pick(rng, T["texture"][p["kind"]])
        if c == "mixture":
            a, b = (self._source_caption(q, rng) for q in p["parts"])
            return _pick(rng, T["mixture"]).format(a=a, b=b)
        raise ValueError(c)

    def caption(self, params: dict, rng: np.random.Generator) -> str:
        T = TEMPLATES[self.split]
        src = self._source_caption(params, rng)
        mods = []
        if params.get("placement") is not None:
            mods.append(_pick(rng, T["placement"][params["placement"]]))
        if params.get("envelope") is not None:
            mods.append(_pick(rng, T["envelope"][params["envelope"]]))
        if len(mods) == 2 and rng.random() < 0.5:
            mods.reverse()
        m = ""
        if mods:
            join = _pick(rng, T["mod_join"])
            m = join + (", " if join == ", " else " and ").join(mods) if len(mods) > 1 else join + mods[0]
        text = _pick(rng, T["wrapper"]).format(s=src, m=m)
        return fix_articles(text)


class _FirstChoice:
    """Stands in for a generator where a caption is drawn: every pick takes the first template or synonym, and two
    modifiers keep their order."""

    @staticmethod
    def integers(n) -> int:
        return 0

    @staticmethod
    def random() -> float:
        return 1.0


def canonical_caption(params: dict) -> str:
    """One fixed training-split caption of a clip's ground truth: the first template and synonym of each part, a
    stated pitch in whole Hz. Two captions of the same sound in different words have the same canonical one."""
    if "pitch_hz" in params:
        params = {**params, "pitch_text": f"{int(round(params['pitch_hz']))} Hz"}
    return SyntheticCorpus("train").caption(params, _FirstChoice())


def heldout_caption_set(n: int, seed: int = 1234) -> list[Clip]:
    corpus = SyntheticCorpus("heldout", seed=seed)
    return [corpus[i] for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Rendering (pure functions of params)
# ----------------------------------------------------------------------------------------------
_TABLE = 4096
_TABLE_CACHE: dict = {}


def _wavetable(waveform: str, n_harm: int) -> np.ndarray:
    """One band-limited period (``_TABLE`` points + 1 guard point) of a waveform, peak ~1."""
    n_harm = int(max(1, min(n_harm, _TABLE // 2 - 1)))
    key = (waveform, n_harm)
    if key in _TABLE_CACHE:
        return _TABLE_CACHE[key]
    k = np.arange(1, n_harm + 1, dtype=np.float64)
    spec = np.zeros(_TABLE // 2 + 1, dtype=np.complex128)
    if waveform == "sine":
        amp = np.zeros_like(k); amp[0] = 1.0
    elif waveform == "square":
        amp = np.where(k % 2 == 1, 4.0 / (np.pi * k), 0.0)
    elif waveform == "sawtooth":
        amp = 2.0 / (np.pi * k) * np.where(k % 2 == 1, 1.0, -1.0)
    elif waveform == "triangle":
        amp = np.where(k % 2 == 1, 8.0 / (np.pi ** 2 * k ** 2), 0.0) * np.where((k // 2) % 2 == 0, 1.0, -1.0)
    else:
        raise ValueError(f"unknown waveform {waveform!r}")
    # sum_k amp_k * sin(2 pi k x)  ->  rfft coefficients -i * amp * N/2
    spec[1:n_harm + 1] = -1j * amp * (_TABLE / 2)
    table = np.fft.irfft(spec, n=_TABLE)
    table = table / np.max(np.abs(table))
    table = np.concatenate([table, table[:1]])
    _TABLE_CACHE[key] = table
    return table


def _osc(phase_cycles: np.ndarray, waveform: str, max_freq: float, sample_rate: int) -> np.ndarray:
    """Band-limited oscillator read at the given cumulative phase (in cycles)."""
    if waveform == "sine":
        return np.sin(2.0 * np.pi * phase_cycles)
    n_harm = int(0.45 * sample_rate / max(max_freq, 1.0))
    return _table_read(_wavetable(waveform, n_harm), phase_cycles)


def _shaped_noise(rng, n: int, colour: str, sample_rate: int, band: tuple | None = None) -> np.ndarray:
    """Coloured Gaussian noise (unit std), optionally band-limited by a smooth spectral mask
    (2nd-order Butterworth-like magnitude between ``band[0]`` and ``band[1]`` Hz)."""
    m = sfft.next_fast_len(n, real=True)
    white = rng.standard_normal(m)
    if colour == "white" and band is None:
        out = white[:n]
    else:
        spec = sfft.rfft(white)
        f = np.fft.rfftfreq(m, 1.0 / sample_rate)
        f[0] = f[1]
        shape = np.ones_like(f) if colour == "white" else \
            np.maximum(f, 20.0) ** (-0.5 if colour == "pink" else -1.0)
        if band is not None:
            lo, hi = band
            if lo:
                shape = shape / np.sqrt(1.0 + (lo / f) ** 4)
            if hi:
                shape = shape / np.sqrt(1.0 + (f / hi) ** 4)
        out = sfft.irfft(spec * shape, n=m)[:n]
    return out / (np.std(out) + 1e-12)


def _harmonic_table(amps, phases) -> np.ndarray:
    spec = np.zeros(_TABLE // 2 + 1, dtype=np.complex128)
    k = np.arange(1, len(amps) + 1)
    spec[k] = np.asarray(amps) * np.exp(1j * np.asarray(phases)) * (_TABLE / 2)
    table = np.fft.irfft(spec, n=_TABLE)
    return np.concatenate([table, table[:1]])


def _table_read(table: np.ndarray, phase_cycles: np.ndarray) -> np.ndarray:
    pos = (phase_cycles % 1.0) * _TABLE
    i = pos.astype(np.int64)
    frac = pos - i
    return table[i] * (1.0 - frac) + table[i + 1] * frac


def _bandpass(x: np.ndarray, lo: float, hi: float, sample_rate: int, order: int = 2) -> np.ndarray:
    sos = ssig.butter(order, [lo, min(hi, 0.45 * sample_rate)], btype="bandpass", fs=sample_rate, output="sos")
    return ssig.sosfilt(sos, x)


def _lowpass(x: np.ndarray, fc: float, sample_rate: int, order: int = 2) -> np.ndarray:
    sos = ssig.butter(order, min(fc, 0.45 * sample_rate), btype="lowpass", fs=sample_rate, output="sos")
    return ssig.sosfilt(sos, x)


def _smooth_random(rng, n: int, sample_rate: int, lo_hz: float, hi_hz: float, k: int = 4) -> np.ndarray:
    """A slow random curve in [-1, 1]: a few sinusoids with random rates and phases."""
    t = np.arange(n) / sample_rate
    out = np.zeros(n)
    for _ in range(k):
        out += np.sin(2 * np.pi * rng.uniform(lo_hz, hi_hz) * t + rng.uniform(0, 2 * np.pi))
    return out / k


def _place(dst: np.ndarray, event: np.ndarray, start: int) -> None:
    if start >= len(dst) or start + len(event) <= 0:
        return
    a = max(start, 0)
    b = min(start + len(event), len(dst))
    dst[a:b] += event[a - start:b - start]


def _impact_hit(kind: str, rng, sample_rate: int) -> np.ndarray:
    if kind == "kick":
        L = int(0.45 * sample_rate)
        t = np.arange(L) / sample_rate
        f_hi, f_lo = rng.uniform(120, 180), rng.uniform(45, 60)
        freq = f_lo + (f_hi - f_lo) * np.exp(-t / 0.03)
        phase = np.cumsum(freq) / sample_rate
        body = np.sin(2 * np.pi * phase) * np.exp(-t / rng.uniform(0.12, 0.25))
        click = rng.standard_normal(L) * np.exp(-t / 0.002) * 0.3
        return body + click
    if kind == "knock":
        L = int(0.25 * sample_rate)
        t = np.arange(L) / sample_rate
        out = np.zeros(L)
        for _ in range(3):
            out += rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * rng.uniform(150, 800) * t + rng.uniform(0, 6.28)) \
                * np.exp(-t / rng.uniform(0.01, 0.04))
        out += _bandpass(rng.standard_normal(L) * np.exp(-t / 0.003), 500, 4000, sample_rate)
        return out
    if kind == "clap":
        L = int(0.3 * sample_rate)
        t = np.arange(L) / sample_rate
        env = np.zeros(L)
        for j in range(3):
            d = j * rng.uniform(0.007, 0.012)
            tt = np.clip(t - d, 0, None)
            env += (t >= d) * np.exp(-tt / 0.004)
        env += (t >= 0.025) * np.exp(-np.clip(t - 0.025, 0, None) / rng.uniform(0.04, 0.09)) * 0.6
        return _bandpass(rng.standard_normal(L) * env, rng.uniform(700, 1000), rng.uniform(2000, 3500), sample_rate)
    raise ValueError(kind)


def _render_source(p: dict, n: int, sample_rate: int) -> np.ndarray:
    """Mono source signal (arbitrary scale) for a non-mixture params dict."""
    rng = np.random.default_rng(p["seed"])
    t = np.arange(n) / sample_rate
    c = p["category"]
    if c == "tone":
        f = p["pitch_hz"]
        return _osc(f * t, p["waveform"], f, sample_rate)
    if c == "clicks":
        period = 60.0 / p["bpm"]
        L = int(round(p["sound_len_s"] * sample_rate))
        tt = np.arange(L) / sample_rate
        if p["sound"] == "click":
            ev = np.sin(2 * np.pi * p["sound_hz"] * tt) * np.exp(-tt / (p["sound_len_s"] / 4))
        else:
            r = max(1, int(0.005 * sample_rate))
            ramp = np.ones(L)
            w = 0.5 - 0.5 * np.cos(np.pi * np.arange(r) / r)
            ramp[:r] = w
            ramp[-r:] = w[::-1]
            ev = np.sin(2 * np.pi * p["sound_hz"] * tt) * ramp
        out = np.zeros(n)
        k = 0
        while True:
            start = int(round((p["onset_s"] + k * period) * sample_rate))
            if start >= n:
                break
            _place(out, ev, start)
            k += 1
        return out
    if c == "noise":
        return _shaped_noise(rng, n, p["colour"], sample_rate)
    if c == "sweep":
        f0, f1 = p["f_start_hz"], p["f_end_hz"]
        T = max(n / sample_rate, 1e-3)
        r = np.log(f1 / f0) / T
        phase = f0 * (np.exp(r * t) - 1.0) / r
        return _osc(phase, p["waveform"], max(f0, f1), sample_rate)
    if c == "siren":
        lo, hi, rate = p["low_hz"], p["high_hz"], p["rate_hz"]
        if p["kind"] == "wail":
            x = 0.5 - 0.5 * np.cos(2 * np.pi * rate * t)
        else:
            x = (np.sin(2 * np.pi * rate * t) > 0).astype(np.float64)
            x = _lowpass(x, 30.0, sample_rate, order=1)
        freq = lo * (hi / lo) ** x
        phase = np.cumsum(freq) / sample_rate
        return _osc(phase, p["waveform"], hi, sample_rate)
    if c == "impact":
        hit = _impact_hit(p["kind"], rng, sample_rate)
        out = np.zeros(n)
        for k in range(p["n_hits"]):
            start = int(round((p["first_hit_s"] + k * p["hit_interval_s"]) * sample_rate))
            _place(out, hit * rng.uniform(0.8, 1.0), start)
        return out
    if c == "texture":
        return _render_texture(p["kind"], rng, n, sample_rate)
    raise ValueError(c)


def _render_texture(kind: str, rng, n: int, sample_rate: int) -> np.ndarray:
    t = np.arange(n) / sample_rate
    dur = n / sample_rate
    if kind == "rain":
        bed = _shaped_noise(rng, n, "pink", sample_rate, band=(400.0, 8000.0)) * 0.5
        imp = np.zeros(n)
        k = rng.poisson(rng.uniform(40, 120) * dur)
        imp[rng.integers(0, n, size=k)] = rng.uniform(0.2, 1.0, size=k) * rng.choice([-1.0, 1.0], size=k)
        L = int(0.006 * sample_rate)
        tt = np.arange(L) / sample_rate
        kern = np.sin(2 * np.pi * rng.uniform(2500, 5000) * tt) * np.exp(-tt / 0.0015)
        drops = ssig.fftconvolve(imp, kern)[:n] * 3.0
        return bed + drops
    if kind == "wind":
        base = _shaped_noise(rng, n, "pink", sample_rate, band=(rng.uniform(150, 300), rng.uniform(900, 1600)))
        gust = 0.6 + 0.4 * _smooth_random(rng, n, sample_rate, 0.1, 0.6)
        return base * gust ** 2
    if kind == "waves":
        base = _shaped_noise(rng, n, "pink", sample_rate, band=(0.0, rng.uniform(1500, 3000)))
        period = rng.uniform(4.0, 8.0)
        ph = rng.uniform(0, 2 * np.pi)
        swell = 0.15 + (0.5 - 0.5 * np.cos(2 * np.pi * t / period + ph)) ** 2
        return base * swell
    if kind == "engine":
        f0 = rng.uniform(30, 70)
        wob = 1.0 + 0.01 * _smooth_random(rng, n, sample_rate, 0.2, 1.0)
        phase = np.cumsum(f0 * wob) / sample_rate
        h = np.arange(1, 11)
        table = _harmonic_table(rng.uniform(0.3, 1.0, size=10) / h, rng.uniform(0, 2 * np.pi, size=10))
        out = _table_read(table, phase)
        am = 1.0 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * t)
        return out * am + 0.1 * _shaped_noise(rng, n, "brown", sample_rate, band=(0.0, 400.0))
    if kind == "birds":
        out = np.zeros(n)
        k = max(1, int(rng.poisson(rng.uniform(2, 6) * dur)))
        for _ in range(k):
            L = int(rng.uniform(0.04, 0.15) * sample_rate)
            tt = np.arange(L) / sample_rate
            fa = rng.uniform(2500, 5000)
            fb = fa + rng.uniform(-1500, 1500)
            freq = fa + (fb - fa) * tt / tt[-1]
            ph = np.cumsum(freq) / sample_rate
            ev = np.sin(2 * np.pi * ph) * np.hanning(L) * rng.uniform(0.4, 1.0)
            _place(out, ev, int(rng.integers(0, max(1, n - L // 2))))
        return out
    if kind == "phone":
        if rng.random() < 0.5:     # two-tone ring
            fa, fb = rng.choice([[440.0, 480.0], [400.0, 450.0]])
            tone = np.sin(2 * np.pi * fa * t) + np.sin(2 * np.pi * fb * t)
        else:                      # trill
            fc = rng.uniform(900, 1500)
            tone = np.sin(2 * np.pi * fc * t) * (np.sin(2 * np.pi * 20.0 * t) > 0)
        cyc = t % 3.0
        gate = ((cyc < 0.4) | ((cyc >= 0.6) & (cyc < 1.0))).astype(np.float64)
        gate = _lowpass(gate, 200.0, sample_rate, order=1)
        return tone * gate
    if kind == "alarm":
        fc = rng.uniform(800, 1500)
        rate = rng.uniform(2.0, 5.0)
        tone = _osc(fc * t, "square", fc, sample_rate)
        gate = ((t * rate) % 1.0 < 0.5).astype(np.float64)
        gate = _lowpass(gate, 300.0, sample_rate, order=1)
        return tone * gate
    raise ValueError(kind)


def _envelope(p: dict, n: int, sample_rate: int) -> np.ndarray | None:
    e = p.get("envelope")
    if e is None:
        return None
    x = np.arange(n) / max(n - 1, 1)
    if e == "fade in":
        return np.clip(x / p["envelope_frac"], 0.0, 1.0) ** 2
    if e == "fade out":
        return np.clip((1.0 - x) / p["envelope_frac"], 0.0, 1.0) ** 2
    if e == "getting louder":
        return 10.0 ** ((x - 1.0) * p["envelope_range_db"] / 20.0)
    if e == "getting quieter":
        return 10.0 ** (-x * p["envelope_range_db"] / 20.0)
    if e == "short burst":
        t = np.arange(n) / sample_rate
        a, L = p["burst_start_s"], p["burst_len_s"]
        r = min(0.01, L / 4)
        up = np.clip((t - a) / r, 0.0, 1.0)
        down = np.clip((a + L - t) / r, 0.0, 1.0)
        return np.minimum(up, down)
    raise ValueError(e)


def render(params: dict, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Render a params dict to float32 stereo audio ``[2, round(duration * sample_rate)]``."""
    n = int(round(params["duration"] * sample_rate))
    if params["category"] == "mixture":
        mono = np.zeros(n)
        for q in params["parts"]:
            s = _render_source(q, n, sample_rate)
            s = s / (np.max(np.abs(s)) + 1e-12)
            mono += s * 10.0 ** (q.get("gain_db", 0.0) / 20.0)
    else:
        mono = _render_source(params, n, sample_rate)
    env = _envelope(params, n, sample_rate)
    if env is not None:
        mono = mono * env
    # 5 ms de-click ramps at both ends
    r = min(int(0.005 * sample_rate), n // 2)
    if r > 0:
        w = 0.5 - 0.5 * np.cos(np.pi * np.arange(r) / r)
        mono[:r] *= w
        mono[n - r:] *= w[::-1]
    if "pan_start_db" in params:
        x = np.arange(n) / max(n - 1, 1)
        bal = params["pan_start_db"] + (params["pan_end_db"] - params["pan_start_db"]) * x
    else:
        bal = params.get("pan_db", 0.0)
    # energy ratio L/R = 10^(bal/10) with gL * gR = 1
    gl = 10.0 ** (np.asarray(bal) / 40.0)
    gr = 1.0 / gl
    stereo = np.stack([mono * gl, mono * gr])
    peak = float(np.max(np.abs(stereo)))
    target = 10.0 ** (params["gain_db"] / 20.0)
    if peak > 0:
        stereo = stereo * (target / peak)
    return stereo.astype(np.float32)
