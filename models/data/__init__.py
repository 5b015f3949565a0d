"""Synthetic captioned sound corpus (training data and held-out evaluation captions)."""
from .corpus import (SAMPLE_RATE, Clip, SyntheticCorpus, render, heldout_caption_set,
                     HELDOUT_PITCHES_HZ, HELDOUT_BPMS, TEMPLATES)

__all__ = ["SAMPLE_RATE", "Clip", "SyntheticCorpus", "render", "heldout_caption_set",
           "HELDOUT_PITCHES_HZ", "HELDOUT_BPMS", "TEMPLATES"]
