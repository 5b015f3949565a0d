from models.text.encoders import (
    CachedTextEncoder,
    HFTextEncoder,
    TextEmbedding,
    TextEncoder,
    load_text_encoder,
    minilm_path,
)

__all__ = ["TextEncoder", "TextEmbedding", "HFTextEncoder", "CachedTextEncoder", "load_text_encoder", "minilm_path"]
