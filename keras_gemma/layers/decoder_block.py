import keras

from keras_gemma.layers.attention import GemmaAttention
from keras_gemma.layers.feed_forward import GemmaFeedForward
from keras_gemma.layers.rms_normalization import RMSNormalization


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaDecoderBlock(keras.layers.Layer):
    """One Gemma layer: pre-norm residual attention, then pre-norm GeGLU.

    Call arguments are those of `GemmaAttention`; with a cache the block
    returns `(outputs, updated_cache)`.

    Example:
    >>> import numpy as np
    >>> block = GemmaDecoderBlock(intermediate_dim=32, num_query_heads=4,
    ...                           num_key_value_heads=1, head_dim=8)
    >>> tuple(block(np.ones((2, 5, 16), "float32")).shape)
    (2, 5, 16)
    """

    def __init__(
        self,
        intermediate_dim,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        layer_norm_epsilon=1e-6,
        dropout=0.0,
        kernel_initializer="glorot_uniform",
        quantization_mode=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # (`quantization_mode` is Keras's name for this layer's own policy.)
        self.projection_quantization_mode = quantization_mode
        self.intermediate_dim = intermediate_dim
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.layer_norm_epsilon = layer_norm_epsilon
        self.dropout = dropout
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        policy, eps = self.dtype_policy, self.layer_norm_epsilon
        self.pre_attention_norm = RMSNormalization(eps, dtype=policy, name="pre_attention_norm")
        self.attention = GemmaAttention(
            self.num_query_heads,
            self.num_key_value_heads,
            self.head_dim,
            dropout=self.dropout,
            kernel_initializer=self.kernel_initializer,
            quantization_mode=self.projection_quantization_mode,
            dtype=policy,
            name="attention",
        )
        self.pre_ffw_norm = RMSNormalization(eps, dtype=policy, name="pre_ffw_norm")
        self.feed_forward = GemmaFeedForward(
            self.intermediate_dim,
            kernel_initializer=self.kernel_initializer,
            quantization_mode=self.projection_quantization_mode,
            dtype=policy,
            name="feed_forward",
        )
        self.residual_dropout = keras.layers.Dropout(self.dropout, dtype=policy)
        self.residual_dropout.build(input_shape)
        for layer in (
            self.pre_attention_norm,
            self.attention,
            self.pre_ffw_norm,
            self.feed_forward,
        ):
            layer.build(input_shape)

    def call(
        self,
        x,
        padding_mask=None,
        cache=None,
        cache_update_index=0,
        training=None,
        segment_ids=None,
    ):
        attended = self.attention(
            self.pre_attention_norm(x),
            padding_mask=padding_mask,
            cache=cache,
            cache_update_index=cache_update_index,
            training=training,
            segment_ids=segment_ids,
        )
        if cache is not None:
            attended, cache = attended
        x = x + self._dropout(attended, training)
        x = x + self._dropout(self.feed_forward(self.pre_ffw_norm(x)), training)
        return x if cache is None else (x, cache)

    def _dropout(self, x, training):
        # Skipping the layer call at rate 0 saves its overhead in every
        # eager decode step.
        return self.residual_dropout(x, training=training) if self.dropout > 0 else x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "intermediate_dim": self.intermediate_dim,
            "num_query_heads": self.num_query_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "dropout": self.dropout,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "quantization_mode": self.projection_quantization_mode,
        }
