"""Offline evaluators: an external pitch tracker (pretrained CREPE) and caption-adherence metrics."""
from .pitch import PitchTracker
from .adherence import (channel_balance_db, placement_matches, estimate_tempo, pitch_error,
                        evaluate_clip, summarize)

__all__ = ["PitchTracker", "channel_balance_db", "placement_matches", "estimate_tempo", "pitch_error",
           "evaluate_clip", "summarize"]
