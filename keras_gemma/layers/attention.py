import keras
from keras import ops

from keras_gemma.layers.projection import project
from keras_gemma.layers.projection import projection
from keras_gemma.layers.rotary_embedding import RotaryEmbedding
from keras_gemma.layers.rotary_embedding import apply_rotary
from keras_gemma.layers.rotary_embedding import rotary_angles

# Masked logits get this instead of -inf: a fully masked row (a padding query)
# then softmaxes to a harmless uniform average instead of NaN.
MASKED_LOGIT = -1e9


def attention_mask(query_length, key_length, start_index=0, padding_mask=None, segment_ids=None):
    """Boolean `[batch or 1, query, key]` mask: causal, plus padding if given.

    Query `i` sits at position `start_index + i` and may see keys at positions
    up to its own; with a key/value cache the keys are the whole cache, so
    slots not yet written (later positions) are hidden by the same rule.
    `segment_ids` (`[batch, sequence]`, no cache) also hide keys of other
    examples packed into the same row.
    """
    query_positions = ops.arange(query_length) + start_index
    key_positions = ops.arange(key_length)
    mask = key_positions[None, :] <= query_positions[:, None]  # [t, s]
    mask = mask[None]  # [1, t, s]
    if padding_mask is not None:
        mask = ops.logical_and(mask, ops.cast(padding_mask, "bool")[:, None, :])
    if segment_ids is not None:
        mask = ops.logical_and(mask, segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def segment_positions(segment_ids):
    """Each token's position within its packed example, `[batch, sequence]`.

    >>> import numpy as np
    >>> ops.convert_to_numpy(segment_positions(np.array([[1, 1, 1, 2, 2, 0]]))).tolist()
    [[0, 1, 2, 0, 1, 0]]
    """
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    length = ops.shape(segment_ids)[1]
    causal = ops.arange(length)[None, :] <= ops.arange(length)[:, None]
    earlier = ops.logical_and(same, causal[None])
    return ops.sum(ops.cast(earlier, "int32"), axis=-1) - 1


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaAttention(keras.layers.Layer):
    """Multi-query, grouped-query or multi-head attention with a KV cache.

    `num_key_value_heads=1` is multi-query (Gemma 2B), equal to
    `num_query_heads` is multi-head (Gemma 7B), and any divisor in between is
    grouped-query: query head `i` reads key/value head
    `i // (num_query_heads // num_key_value_heads)`. Queries are scaled by
    `head_dim ** -0.5` and the softmax runs in float32.

    With a cache, the new keys and values are written into it at
    `cache_update_index` (`slice_update`, in place under XLA) and the queries
    attend over the whole cache, so a decode step never recomputes the prefix.

    Kernels are stored `[out, in]` like the feed-forward's (see
    `GemmaFeedForward`): query/key/value `[heads, head_dim, hidden]`, output
    `[hidden, heads * head_dim]` (Hugging Face's layout, heads split out on
    the query side; keras-hub's is `[heads, hidden, head_dim]` and `[heads,
    head_dim, hidden]`, transposed by `weight_names`). LoRA then factors
    every projection as PEFT does.

    Args:
        num_query_heads: number of query heads.
        num_key_value_heads: number of key/value heads; divides the former.
        head_dim: size of each head.
        dropout: dropout rate on attention probabilities while training.
        kernel_initializer: initializer of the four projections.
        quantization_mode: e.g. `"int8"`: build the projections quantized.

    Call arguments:
        x: `[batch, sequence, hidden_dim]` inputs.
        padding_mask: optional `[batch, key_length]`; 0 hides a key.
        cache: optional `(key_cache, value_cache)`, each
            `[batch, max_length, num_key_value_heads, head_dim]`.
        cache_update_index: position of `x[:, 0]` in the sequence.
        segment_ids: optional `[batch, sequence]` ids of examples packed into
            one row (no cache): attention stays within an example and rotary
            positions restart at each.

    Returns:
        `[batch, sequence, hidden_dim]`, and the updated cache if one was given.

    Example:
    >>> import numpy as np
    >>> attention = GemmaAttention(num_query_heads=4, num_key_value_heads=1,
    ...                            head_dim=8)
    >>> tuple(attention(np.ones((2, 5, 16), "float32")).shape)
    (2, 5, 16)
    """

    def __init__(
        self,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        dropout=0.0,
        kernel_initializer="glorot_uniform",
        quantization_mode=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_query_heads % num_key_value_heads:
            raise ValueError(
                "`num_query_heads` must be a multiple of `num_key_value_heads`. "
                f"Received: num_query_heads={num_query_heads}, "
                f"num_key_value_heads={num_key_value_heads}"
            )
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        # (`quantization_mode` is Keras's name for this layer's own policy.)
        self.projection_quantization_mode = quantization_mode

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        n, kv, h = self.num_query_heads, self.num_key_value_heads, self.head_dim

        def dense(equation, output_shape, name):
            return projection(
                equation,
                output_shape,
                self.kernel_initializer,
                self.dtype_policy,
                name,
                self.projection_quantization_mode,
            )

        self.query_dense = dense("btd,nhd->btnh", (None, n, h), "query")
        self.key_dense = dense("bsd,khd->bskh", (None, kv, h), "key")
        self.value_dense = dense("bsd,khd->bskh", (None, kv, h), "value")
        # `[hidden, heads * head_dim]`, not `[hidden, heads, head_dim]`: LoRA
        # factors a kernel's last axis, and only a merged input axis gives the
        # adapter Hugging Face PEFT's `o_proj` shape.
        self.output_dense = dense("btm,dm->btd", (None, hidden_dim), "attention_output")
        for layer in (self.query_dense, self.key_dense, self.value_dense):
            layer.build(input_shape)
        self.output_dense.build((None, None, n * h))
        self.rotary_embedding = RotaryEmbedding(dtype=self.dtype_policy)
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        # Weightless, but `Model.quantize` refuses models with unbuilt layers.
        self.rotary_embedding.build((None, None, n, h))
        self.dropout_layer.build((None, kv, None, None))

    def call(
        self,
        x,
        padding_mask=None,
        cache=None,
        cache_update_index=0,
        training=None,
        segment_ids=None,
    ):
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("`segment_ids` (packed rows) are for training, not a KV cache.")
            segment_ids = ops.convert_to_tensor(segment_ids, "int32")
        # The angles are shared by queries and keys; computing them here (not
        # through two layer calls) also trims per-step overhead when decoding.
        cos, sin = rotary_angles(
            ops.shape(x)[1],
            self.head_dim,
            cache_update_index,
            self.rotary_embedding.max_wavelength,
            positions=None if segment_ids is None else segment_positions(segment_ids),
        )
        query = apply_rotary(project(self.query_dense, x), cos, sin)
        key = apply_rotary(project(self.key_dense, x), cos, sin)
        value = project(self.value_dense, x)
        if cache is not None:
            key_cache, value_cache = cache
            start = [0, cache_update_index, 0, 0]
            key = ops.slice_update(key_cache, start, ops.cast(key, key_cache.dtype))
            value = ops.slice_update(value_cache, start, ops.cast(value, value_cache.dtype))
            cache = (key, value)
        mask = attention_mask(
            ops.shape(x)[1], ops.shape(key)[1], cache_update_index, padding_mask, segment_ids
        )
        attended = self._attend(query, key, value, mask, training)
        output = project(self.output_dense, attended)
        return output if cache is None else (output, cache)

    def _attend(self, query, key, value, mask, training):
        batch, length = ops.shape(query)[0], ops.shape(query)[1]
        kv, h = self.num_key_value_heads, self.head_dim
        groups = self.num_query_heads // kv
        query = query * ops.cast(h**-0.5, query.dtype)
        # Fold each key/value head's group of query heads into the query
        # axis, so every product is a plain batched matmul, which XLA's CPU
        # compiler runs much faster than a group kept as its own einsum axis.
        query = ops.reshape(query, (batch, length, kv, groups, h))
        query = ops.transpose(query, (0, 1, 3, 2, 4))  # [b, t, g, k, h]
        query = ops.reshape(query, (batch, length * groups, kv, h))
        logits = ops.einsum("bqkh,bskh->bkqs", query, key)  # [b, k, t*g, s]
        logits = ops.cast(logits, "float32")
        # Row t*g + i of the folded query axis is position t.
        mask = ops.repeat(mask, groups, axis=1)  # [b or 1, t*g, s]
        logits = ops.where(mask[:, None, :, :], logits, MASKED_LOGIT)
        probabilities = ops.cast(ops.softmax(logits, axis=-1), value.dtype)
        if self.dropout > 0:
            probabilities = self.dropout_layer(probabilities, training=training)
        output = ops.einsum("bkqs,bskh->bqkh", probabilities, value)  # [b, t*g, k, h]
        output = ops.reshape(output, (batch, length, groups, kv, h))
        output = ops.transpose(output, (0, 1, 3, 2, 4))  # [b, t, k, g, h]
        return ops.reshape(output, (batch, length, self.num_query_heads * h))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "num_query_heads": self.num_query_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "dropout": self.dropout,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "quantization_mode": self.projection_quantization_mode,
        }
