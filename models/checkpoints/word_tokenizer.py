"""A small word-level tokenizer for the random-weight checkpoints of published sizes (``models.checkpoints.sized``):
the real vocabularies do not matter for random weights, and none can be downloaded here."""
from __future__ import annotations

WORDS = ("<pad>", "</s>", "<unk>", ",", ".", "a", "an", "the", "of", "and", "with", "in", "on", "at", "then", "hz",
         "bpm", "tone", "rain", "tin", "roof", "dog", "barks", "birds", "sing", "engine", "car", "door", "wind",
         "thunder", "water", "piano", "guitar", "drums", "bass", "synth", "pad", "beat", "house", "techno", "ambient",
         "warm", "soft", "loud", "fast", "slow", "distant", "footsteps", "crowd", "applause", "bell", "siren",
         "train", "ocean", "waves", "fire", "crackling", "arpeggios", "melody", "chords", "loop", "kick")


def word_tokenizer(max_length: int):
    """A T5-style tokenizer without T5's vocabulary: lower-cased words and punctuation, unknown words -> <unk>,
    every prompt ended by </s> (pad 0, eos 1, unk 2 as in T5)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)
