from models.codec.base import AudioCodec
from models.codec.stft_autoencoder import STFTAutoencoder, STFTAutoencoderConfig

__all__ = ["AudioCodec", "STFTAutoencoder", "STFTAutoencoderConfig"]
