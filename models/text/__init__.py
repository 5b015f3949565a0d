from models.text.encoders import (
    CachedTextEncoder,
    HFTextEncoder,
    NumberChannels,
    TextEmbedding,
    TextEncoder,
    load_text_encoder,
    minilm_path,
)

__all__ = ["TextEncoder", "TextEmbedding", "HFTextEncoder", "NumberChannels", "CachedTextEncoder", "load_text_encoder",
           "minilm_path"]
