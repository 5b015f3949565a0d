"""benchmarks/user_prompts: its prompts state what they are scored on, and its table reads the scores."""
from __future__ import annotations

import argparse
import re

import numpy as np

from benchmarks import user_prompts
from models.eval.adherence import evaluate_clip, summarize


def test_every_prompt_states_the_number_it_is_scored_on():
    for prompt, truth in user_prompts.PROMPTS:
        numbers = {float(n) for n in re.findall(r"\d+", prompt)}
        if truth["category"] == "tone":
            assert truth["pitch_hz"] in numbers, prompt
        if truth["category"] == "clicks":
            assert truth["bpm"] in numbers, prompt
        if "placement" in truth:
            assert truth["placement"] in prompt, prompt


def test_the_table_counts_what_the_scorer_found():
    sr = 8000
    t = np.arange(sr * 2) / sr
    clips = []
    for prompt, truth in user_prompts.PROMPTS:
        wave = np.zeros((2, t.size))
        if truth.get("placement") == "left":
            wave[0] = np.sin(2 * np.pi * 300 * t)
        elif truth.get("placement") == "right":
            wave[1] = np.sin(2 * np.pi * 300 * t)
        else:
            wave[:] = np.sin(2 * np.pi * 300 * t)
        r = evaluate_clip(wave, sr, truth)  # no pitch tracker: tones are not scored
        r.update(prompt=prompt, seed=0)
        clips.append(r)
    row = {"model": "m", "steps": 8, "seconds_per_clip": 0.5, "peak_rss_mb": 900.0, "summary": summarize(clips),
           "clips": clips}
    placed = sum(1 for _, tr in user_prompts.PROMPTS if "placement" in tr)
    md = user_prompts.markdown([row], argparse.Namespace(out_name="x", duration=2.0, seeds="0"))
    clicks = sum(1 for _, tr in user_prompts.PROMPTS if tr["category"] == "clicks")
    assert "| m | 8 |" in md and f"{placed} of {placed}" in md and f" of {clicks} (" in md
    assert user_prompts.of(None, 0) == "-" and user_prompts.of(0.25, 8) == "2 of 8"
