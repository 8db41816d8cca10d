import keras
import numpy as np
import pytest
from helpers import assert_close
from helpers import assert_config_round_trip
from helpers import to_numpy

from keras_gemma.layers import GemmaAttention
from keras_gemma.layers import GemmaDecoderBlock
from keras_gemma.layers import GemmaFeedForward
from keras_gemma.layers import RMSNormalization
from keras_gemma.layers import RotaryEmbedding


def test_rms_normalization_matches_hand_computation():
    x = np.array([[[1.0, 2.0, 3.0, 4.0]]], "float32")
    norm = RMSNormalization(epsilon=1e-6)
    norm.build(x.shape)
    norm.scale.assign(np.array([0.0, 1.0, -0.5, 2.0], "float32"))
    rms = np.sqrt((1 + 4 + 9 + 16) / 4 + 1e-6)
    expected = x / rms * np.array([1.0, 2.0, 0.5, 3.0])
    assert_close(norm(x), expected, atol=1e-6)


def _bfloat16_half_ulp(values):
    """Half the spacing of bfloat16 numbers (8 significant bits) at `values`."""
    return 2.0 ** (np.floor(np.log2(np.abs(values))) - 8)


def test_rms_normalization_computes_in_float32_under_bfloat16():
    # With the statistics and the `1 + scale` product in float32, the only
    # bfloat16 rounding is the output's: every element is the exact result
    # correctly rounded, within half a bfloat16 ulp. Statistics or the scale
    # product taken in bfloat16 round twice more and miss that bound on about a
    # quarter (keras.ops.rms_normalization in bfloat16) to half (the formula
    # written in bfloat16 ops) of these 1024 elements, on every backend.
    import ml_dtypes

    rng = np.random.default_rng(0)
    # Inputs and scales that bfloat16 holds exactly, so only the layer rounds.
    x = rng.normal(3.0, 1.0, (4, 256)).astype(ml_dtypes.bfloat16).astype("float32")
    scale = rng.normal(0.0, 0.5, 256).astype(ml_dtypes.bfloat16).astype("float32")
    norm = RMSNormalization(epsilon=1e-6, dtype="bfloat16")
    norm.build(x.shape)
    norm.scale.assign(scale)
    out = norm(x)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    x64 = x.astype("float64")
    exact = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + 1e-6) * (1 + scale)
    error = np.abs(to_numpy(keras.ops.cast(out, "float32")) - exact)
    # 1e-6 relative: the float32 arithmetic before the one rounding.
    assert (error <= _bfloat16_half_ulp(exact) + 1e-6 * np.abs(exact)).all()


def test_rotary_embedding_matches_hand_rotation():
    head_dim, base = 4, 10000.0
    x = np.random.default_rng(0).normal(size=(1, 3, 1, head_dim)).astype("float32")
    out = to_numpy(RotaryEmbedding(max_wavelength=base)(x, start_index=5))
    for t in range(3):
        position = 5 + t
        for i in range(head_dim // 2):
            angle = position * base ** (-2 * i / head_dim)
            a, b = x[0, t, 0, i], x[0, t, 0, i + head_dim // 2]
            np.testing.assert_allclose(
                out[0, t, 0, [i, i + head_dim // 2]],
                [a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)],
                atol=1e-5,
            )


def test_rotary_offset_equals_position_in_longer_sequence():
    x = np.random.default_rng(1).normal(size=(2, 6, 3, 8)).astype("float32")
    rope = RotaryEmbedding()
    assert_close(rope(x[:, 4:], start_index=4), to_numpy(rope(x))[:, 4:], atol=1e-5)


def test_attention_matches_numpy_reference_with_groups():
    rng = np.random.default_rng(2)
    n, kv, h, d, t = 4, 2, 8, 16, 5
    layer = GemmaAttention(num_query_heads=n, num_key_value_heads=kv, head_dim=h)
    x = rng.normal(size=(2, t, d)).astype("float32")
    padding = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    out = to_numpy(layer(x, padding_mask=padding))

    rope = RotaryEmbedding()
    # Kernels `[out, in]`: query/key/value `[heads, h, d]`, output `[d, n * h]`.
    q = to_numpy(rope(np.einsum("btd,nhd->btnh", x, to_numpy(layer.query_dense.kernel))))
    k = to_numpy(rope(np.einsum("btd,khd->btkh", x, to_numpy(layer.key_dense.kernel))))
    v = np.einsum("btd,khd->btkh", x, to_numpy(layer.value_dense.kernel))
    expected = np.zeros((2, t, n, h), "float32")
    for b in range(2):
        for head in range(n):
            g = head // (n // kv)  # query head -> its key/value head
            logits = q[b, :, head] @ k[b, :, g].T / np.sqrt(h)
            allowed = np.tril(np.ones((t, t), bool)) & padding[b][None, :].astype(bool)
            logits = np.where(allowed, logits, -1e9)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            expected[b, :, head] = p @ v[b, :, g]
    output_kernel = to_numpy(layer.output_dense.kernel).reshape(d, n, h)
    expected = np.einsum("btnh,dnh->btd", expected, output_kernel)
    # Padded query rows are irrelevant; compare the real ones.
    np.testing.assert_allclose(out[0], expected[0], atol=1e-5)
    np.testing.assert_allclose(out[1, :3], expected[1, :3], atol=1e-5)


def test_attention_cache_step_equals_full_pass():
    rng = np.random.default_rng(3)
    layer = GemmaAttention(num_query_heads=4, num_key_value_heads=1, head_dim=8)
    x = rng.normal(size=(1, 6, 16)).astype("float32")
    full = to_numpy(layer(x))
    cache = (np.zeros((1, 8, 1, 8), "float32"), np.zeros((1, 8, 1, 8), "float32"))
    _, cache = layer(x[:, :4], cache=cache, cache_update_index=0)
    for i in (4, 5):
        step, cache = layer(x[:, i : i + 1], cache=cache, cache_update_index=i)
        assert_close(step[:, 0], full[:, i], atol=1e-5)


def test_feed_forward_is_geglu():
    layer = GemmaFeedForward(intermediate_dim=16)
    x = np.random.default_rng(4).normal(size=(1, 2, 6)).astype("float32")
    out = layer(x)
    # Kernels are `[out, in]`, each branch half of intermediate_dim.
    assert layer.ffw_gating.kernel.shape == (8, 6)
    assert layer.ffw_linear.kernel.shape == (6, 8)
    gate = x @ to_numpy(layer.ffw_gating.kernel).T
    up = x @ to_numpy(layer.ffw_gating_2.kernel).T
    gelu = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
    assert_close(out, (gelu * up) @ to_numpy(layer.ffw_linear.kernel).T, atol=1e-5)


@pytest.mark.parametrize(
    "layer",
    [
        RMSNormalization(epsilon=1e-5),
        RotaryEmbedding(max_wavelength=500.0),
        GemmaFeedForward(intermediate_dim=16),
        GemmaAttention(num_query_heads=4, num_key_value_heads=2, head_dim=8, dropout=0.1),
        GemmaDecoderBlock(
            intermediate_dim=16, num_query_heads=2, num_key_value_heads=1, head_dim=4
        ),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_layer_config_round_trip(layer):
    assert_config_round_trip(layer)


def test_attention_rejects_ungroupable_heads():
    with pytest.raises(ValueError, match="multiple of `num_key_value_heads`"):
        GemmaAttention(num_query_heads=3, num_key_value_heads=2, head_dim=8)


@pytest.mark.parametrize("dtype", ["bfloat16", "mixed_bfloat16"])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("rows", [(2, 5), (1, 1)])
@pytest.mark.parametrize(
    "equation, output_shape",
    [
        ("btd,nhd->btnh", (None, 3, 8)),
        ("btd,fd->btf", (None, 24)),
        ("btd,fd->btf", (None, 256)),
    ],
)
def test_projection_products_equal_float64_within_bfloat16_rounding(
    dtype, lora, rows, equation, output_shape
):
    # The einsum of the compute-dtype operands with LoRA merged (under mixed
    # precision Keras merges in bfloat16, hence the tolerance; the adapter
    # adds O(1)).
    from keras_gemma.layers.projection import projection

    initializer = keras.initializers.GlorotUniform(seed=1)  # deterministic tolerances
    layer = projection(equation, output_shape, initializer, keras.dtype_policies.get(dtype), "q")
    layer.build((None, None, 64))
    rng = np.random.default_rng(0)
    if lora:
        layer.enable_lora(2)
        layer.lora_kernel_a.assign(rng.uniform(-0.3, 0.3, layer.lora_kernel_a.shape))
        layer.lora_kernel_b.assign(rng.normal(0, 0.5, layer.lora_kernel_b.shape))
    x = rng.standard_normal((*rows, 64)).astype("float32")
    kernel = to_numpy(keras.ops.cast(layer.kernel, "bfloat16")).astype("float64")
    inputs = to_numpy(keras.ops.cast(x, "bfloat16")).astype("float64")
    expected = np.einsum(equation, inputs, kernel)
    result = layer(x)
    assert keras.backend.standardize_dtype(result.dtype) == "bfloat16"
    np.testing.assert_allclose(
        to_numpy(result).astype("float64"), expected, atol=1e-2 * np.abs(expected).max()
    )


def _block_with_scales(dropout=0.0):
    block = GemmaDecoderBlock(
        intermediate_dim=16, num_query_heads=2, num_key_value_heads=1, head_dim=4, dropout=dropout
    )
    block.build((None, None, 8))
    rng = np.random.default_rng(5)
    for norm in (block.pre_attention_norm, block.pre_ffw_norm):
        norm.scale.assign(rng.normal(0, 0.5, 8).astype("float32"))
    return block


def test_decoder_block_is_pre_norm_residual_attention_then_geglu():
    # Composed from the sub-layers each tested above: h = x + attention(norm(x)),
    # out = h + feed_forward(norm'(h)); and the same through the cache.
    block = _block_with_scales()
    x = np.random.default_rng(6).normal(size=(2, 5, 8)).astype("float32")
    padding = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    h = x + to_numpy(block.attention(block.pre_attention_norm(x), padding_mask=padding))
    expected = h + to_numpy(block.feed_forward(block.pre_ffw_norm(h)))
    out = to_numpy(block(x, padding_mask=padding))
    np.testing.assert_allclose(out[0], expected[0], atol=1e-5)
    np.testing.assert_allclose(out[1, :3], expected[1, :3], atol=1e-5)
    cache = (np.zeros((2, 5, 1, 4), "float32"), np.zeros((2, 5, 1, 4), "float32"))
    cached, _ = block(x, padding_mask=padding, cache=cache, cache_update_index=0)
    np.testing.assert_allclose(to_numpy(cached)[0], expected[0], atol=1e-5)


def test_decoder_block_residual_dropout_only_while_training():
    block = _block_with_scales(dropout=0.5)
    block.attention.dropout = 0.0  # isolate the residual dropout
    x = np.random.default_rng(7).normal(size=(1, 4, 8)).astype("float32")
    inference = to_numpy(block(x, training=False))
    without = _block_with_scales()
    for source, target in zip(block.weights, without.weights):
        target.assign(source)
    assert_close(inference, without(x), atol=1e-6)
    assert np.abs(to_numpy(block(x, training=True)) - inference).max() > 1e-3


def test_attention_mask_and_segment_positions_by_hand():
    from keras_gemma.layers.attention import attention_mask
    from keras_gemma.layers.attention import segment_positions

    segments = np.array([[1, 1, 1, 2, 2, 0]], "int32")
    positions = to_numpy(segment_positions(keras.ops.convert_to_tensor(segments)))
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0]]
    mask = to_numpy(attention_mask(6, 6, segment_ids=keras.ops.convert_to_tensor(segments)))
    expected = np.array(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        bool,
    )
    assert mask.tolist() == [expected.tolist()]
    # Two queries at positions 2 and 3 over a 5-slot cache, slot 1 padded.
    mask = to_numpy(attention_mask(2, 5, start_index=2, padding_mask=np.array([[1, 0, 1, 1, 1]])))
    assert mask.astype(int).tolist() == [[[1, 0, 1, 0, 0], [1, 0, 1, 1, 0]]]


def test_packed_attention_equals_each_example_alone():
    # Segment ids keep attention within an example and restart its rotary
    # positions: each packed example gets what it gets on its own row.
    layer = GemmaAttention(num_query_heads=4, num_key_value_heads=2, head_dim=8)
    x = np.random.default_rng(8).normal(size=(1, 6, 16)).astype("float32")
    packed = to_numpy(layer(x, segment_ids=np.array([[1, 1, 1, 2, 2, 0]])))
    assert_close(packed[:, :3], layer(x[:, :3]), atol=1e-5)
    assert_close(packed[:, 3:5], layer(x[:, 3:5]), atol=1e-5)
