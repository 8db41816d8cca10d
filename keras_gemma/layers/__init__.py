"""Gemma's building blocks, each a Keras layer written in `keras.ops` only."""

from keras_gemma.layers.attention import GemmaAttention
from keras_gemma.layers.decoder_block import GemmaDecoderBlock
from keras_gemma.layers.feed_forward import GemmaFeedForward
from keras_gemma.layers.rms_normalization import RMSNormalization
from keras_gemma.layers.rotary_embedding import RotaryEmbedding

__all__ = [
    "GemmaAttention",
    "GemmaDecoderBlock",
    "GemmaFeedForward",
    "RMSNormalization",
    "RotaryEmbedding",
]
