"""The plain-PyTorch generation path equals the Keras forward pass."""

import keras
import numpy as np
import pytest
from conftest import make_backbone
from helpers import to_numpy

from keras_gemma import GemmaCausalLM
from keras_gemma import backends
from keras_gemma import generation
from keras_gemma import internals

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "torch", reason="backends.torch_cpu is the torch backend's path"
)


def _prepare(variant):
    if variant == "mixed_bfloat16":
        return GemmaCausalLM(make_backbone("gqa", seed=3, dtype="mixed_bfloat16"))
    layout = {"mqa": "mqa", "mha": "mha"}.get(variant, "gqa")
    dtype = "bfloat16" if variant in ("bfloat16", "bfloat16_int8") else "float32"
    lm = GemmaCausalLM(make_backbone(layout, seed=3, dtype=dtype))
    if variant in ("int8", "bfloat16_int8"):
        lm.quantize("int8")
    if variant == "lora":
        lm.backbone.enable_lora(2, ["query", "key", "attention_output", "ffw_linear"])
        for variable in lm.backbone.trainable_variables:
            if "lora_kernel_b" in variable.path:  # zero at init: make the adapters matter
                variable.assign(np.random.default_rng(0).normal(0, 0.3, variable.shape))
    return lm


@pytest.mark.parametrize(
    "variant",
    ["mqa", "gqa", "mha", "bfloat16", "mixed_bfloat16", "int8", "bfloat16_int8", "lora"],
)
@pytest.mark.parametrize("native", [True, False])
def test_prefill_and_steps_equal_the_keras_forward(monkeypatch, variant, native):
    from keras_gemma.backends.torch_cpu import Decoder as TorchDecoder

    _use_cpu_kernels(monkeypatch, native)
    lm = _prepare(variant)
    ids = keras.ops.convert_to_tensor(
        np.random.default_rng(1).integers(3, lm.backbone.vocabulary_size, (2, 16)), "int32"
    )
    decoder, keras_decoder = TorchDecoder(lm.backbone), generation.KerasDecoder(lm)
    length = 8
    ours, our_logits = decoder.prefill(ids, length, length - 1)
    theirs, their_logits = keras_decoder.prefill(ids, length, length - 1)
    # The bfloat16 paths round alike. With int8 they dequantize differently;
    # with u = 2**-8, bfloat16's unit roundoff: Keras on torch rounds each
    # weight q / s to bfloat16 (within u, errors of either sign that mostly
    # cancel in a sum), we scale the float32 sum of x * q by 1 / s rounded to
    # bfloat16 (within u of the product, one sign per channel). So each of the 7
    # products of a block, the embedding lookup and the logits departs by about
    # u (at most 4u of sum |x * w|:
    # `test_bfloat16_int8_products_are_within_four_roundings_of_keras`), and to
    # first order the departures add along the 7 * layers + 2 of them (an
    # estimate relative to the largest logit, not a proof). Nothing else
    # differs: rounding the decoder's weights, lookups and logits as Keras does
    # makes the logits equal.
    int8_drift = (7 * lm.backbone.num_layers + 2) * 2.0**-8
    tolerance = {"bfloat16_int8": int8_drift, "bfloat16": 2e-2, "mixed_bfloat16": 2e-2}
    tolerance = tolerance.get(variant, 1e-4)
    np.testing.assert_allclose(
        to_numpy(our_logits),
        to_numpy(their_logits),
        atol=tolerance * np.abs(to_numpy(their_logits)).max(),
    )
    for index in range(length, length + 4):
        our_logits, ours = decoder.next_logits(ids, ours, index)
        their_logits, theirs = keras_decoder.next_logits(ids, theirs, index)
        their_logits = to_numpy(their_logits)
        scale = np.abs(their_logits).max()
        np.testing.assert_allclose(to_numpy(our_logits), their_logits, atol=tolerance * scale)
    for our_layer, their_layer in zip(ours, theirs):
        for our_cache, their_cache in zip(our_layer, their_layer):
            their_cache = to_numpy(their_cache).astype("float32")
            np.testing.assert_allclose(
                to_numpy(our_cache).astype("float32"),
                their_cache,
                atol=tolerance * np.abs(their_cache).max(),
            )


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_int8_products_are_within_four_roundings_of_keras(monkeypatch, native):
    """Each int8 product of the decoder against the Keras layer's own, on
    the same bfloat16 rows. With u = 2**-8 and w = q / s: Keras's is within
    u * sum |x * w| (weights rounded) + u * |y| (the result rounded) of the
    exact product, its logits within 2u * |y| (the sum, then its quotient by
    s, rounded); ours within 2u * |y| (1 / s and the result rounded). Float32
    sums add ~64 * 2**-24 of sum |x * w|: the two differ by at most 4u of it."""
    import torch

    from keras_gemma.backends.torch_cpu import Decoder as TorchDecoder

    _use_cpu_kernels(monkeypatch, native)
    lm = _prepare("bfloat16_int8")
    decoder = TorchDecoder(lm.backbone)
    rng = np.random.default_rng(2)
    bound = 4 * 2.0**-8 + 1e-4

    def check(ours, theirs, x, q, s):
        exact = np.abs(to_numpy(x).astype("float64")) @ np.abs(q / s[:, None]).T
        difference = np.abs(to_numpy(ours).astype("float64") - theirs)
        assert np.all(difference <= bound * exact), (difference / exact).max()

    for block, layer in zip(decoder.blocks, lm.backbone.transformer_layers):
        attention, ffw = layer.attention, layer.feed_forward
        value = attention.value_dense
        for group, layers in (
            (block.query_key_value, [attention.query_dense, attention.key_dense, value]),
            (block.output, [attention.output_dense]),
            (block.gate_up, [ffw.ffw_gating, ffw.ffw_gating_2]),
            (block.down, [ffw.ffw_linear]),
        ):
            in_dim = group.projections[0].kernel.shape[1]
            # One row (a decode step), the kernel's 16, chunks of 16, and more.
            for rows in (1, 16, 24, 40):
                x = torch.from_numpy(rng.standard_normal((rows, in_dim))).bfloat16()
                for y, keras_layer in zip(group(x), layers):
                    theirs = to_numpy(keras_layer(x[None])).astype("float64").reshape(rows, -1)
                    q = (
                        to_numpy(internals.stored_kernel(keras_layer))
                        .astype("float64")
                        .reshape(-1, in_dim)
                    )
                    s = to_numpy(keras_layer.kernel_scale).astype("float64").reshape(-1)
                    check(y, theirs, x, q, s)
    embedding = lm.backbone.token_embedding
    q = to_numpy(internals.stored_embeddings(embedding)).astype("float64")
    s = to_numpy(embedding.embeddings_scale).astype("float64")
    for rows in (1, 16, 40):
        hidden = torch.from_numpy(rng.standard_normal((rows, q.shape[1]))).bfloat16()
        theirs = to_numpy(lm.compute_logits(hidden[None])[0]).astype("float64")
        check(decoder.logits(hidden), theirs, hidden, q, s)


@pytest.mark.parametrize("variant", ["int8", "bfloat16_int8"])
def test_int8_prefill_rows_past_16_go_through_the_kernel_in_chunks(monkeypatch, variant):
    import torch

    from keras_gemma.backends import cpu_kernels
    from keras_gemma.backends.torch_cpu import Decoder as TorchDecoder

    _use_cpu_kernels(monkeypatch, True)
    rows_per_call = []
    call = cpu_kernels.Products.__call__

    def recording(self, x, *args):
        rows_per_call.append(x.shape[0])
        return call(self, x, *args)

    monkeypatch.setattr(cpu_kernels.Products, "__call__", recording)
    down = TorchDecoder(_prepare(variant).backbone).blocks[0].down
    (projection,) = down.projections
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((24, projection.kernel.shape[1])))
    x = x.to(projection.scale.dtype)
    (y,) = down(x)
    assert rows_per_call == [16, 8]
    expected = (x.double() @ projection.kernel.double().T) * projection.scale.double()
    tolerance = 1e-5 if variant == "int8" else 1e-2
    np.testing.assert_allclose(
        y.double().numpy(), expected.numpy(), atol=tolerance * expected.abs().max().item()
    )


@pytest.mark.parametrize("variant", ["int8", "bfloat16"])
def test_decoder_kernels_are_keras_storage(variant):
    from keras_gemma.backends.torch_cpu import Decoder as TorchDecoder

    lm = _prepare(variant)
    inputs = {"token_ids": np.array([[2, 7, 9, 11]]), "padding_mask": np.ones((1, 4))}
    values = {v.path: to_numpy(v) for v in lm.weights}
    before = to_numpy(lm(inputs))
    decoder = TorchDecoder(lm.backbone)
    attention = lm.backbone.transformer_layers[0].attention
    # One copy of the weights: each [out, in] matrix is a view of Keras's storage.
    for ours, theirs in (
        (decoder.blocks[0].query_key_value.projections[0], attention.query_dense),
        (decoder.blocks[0].output.projections[0], attention.output_dense),
    ):
        assert ours.kernel.is_contiguous()
        assert ours.kernel.data_ptr() == theirs._kernel.value.data_ptr()
    for variable in lm.weights:
        np.testing.assert_array_equal(to_numpy(variable), values[variable.path])
    np.testing.assert_array_equal(to_numpy(lm(inputs)), before)


def test_int8_activations_generate_through_the_keras_forward():
    from keras_gemma.backends import torch_cpu

    lm = GemmaCausalLM(make_backbone("gqa", seed=3))
    lm.quantize("int8", config=keras.quantizers.Int8QuantizationConfig())
    assert not torch_cpu.supports(lm.backbone)
    assert backends.decoder_for(lm.backbone) is None  # the Keras forward pass
    assert isinstance(backends.decoder_for(_prepare("int8").backbone), torch_cpu.Decoder)


def test_cuda_weights_never_reach_the_cpu_decoder(monkeypatch):
    lm = _prepare("mqa")
    assert backends.decoder_for(lm.backbone) is not None
    monkeypatch.setattr(backends, "_device_type", lambda variable: "cuda")
    assert backends.decoder_for(lm.backbone) is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("in_dim", [24, 32])  # `_weight_int8pack_mm` is wrong on 24 in bf16
def test_int8_products_equal_float64_for_any_rows_and_layout(monkeypatch, dtype, in_dim):
    """PyTorch's kernels, where `cpu_kernels` (tested on its own) does not apply."""
    import torch

    from keras_gemma.backends import torch_cpu as torch_decoding

    rng = np.random.default_rng(0)
    kernel = torch.from_numpy(rng.integers(-127, 128, (37, in_dim), dtype=np.int8))
    scale = torch.from_numpy(rng.uniform(0.01, 0.02, 37)).to(getattr(torch, dtype))
    x = torch.from_numpy(rng.standard_normal((20, in_dim))).to(getattr(torch, dtype))
    # Past 8 rows, pieces of 5 rows of the kernel: seven full ones and a
    # ragged last one.
    monkeypatch.setattr(torch_decoding, "_INT8PACK_MAX_ROWS", 8)
    monkeypatch.setattr(torch_decoding, "_FLOAT32_PIECE", 5 * in_dim)
    many = torch_decoding._int8_linear(x, kernel, scale)
    # Rows one at a time, each a view at an offset.
    one_at_a_time = torch.cat(
        [torch_decoding._int8_linear(x[i : i + 1], kernel, scale) for i in range(20)]
    )
    # A view starting 16 bytes into its storage (the kernel segfaults on it).
    shifted = torch.cat([torch.zeros(8, dtype=x.dtype), x.reshape(-1)])[8:].view(x.shape)
    a_few_shifted = torch_decoding._int8_linear(shifted[:4], kernel, scale)
    expected = ((x.double() @ kernel.double().T) * scale.double()).numpy()
    tolerance = 1e-5 if dtype == "float32" else 1e-2
    for result in (many, one_at_a_time, a_few_shifted):
        np.testing.assert_allclose(
            result.double().numpy(),
            expected[: len(result)],
            atol=tolerance * np.abs(expected).max(),
        )


def _use_cpu_kernels(monkeypatch, native):
    """Run the decoder's products through `cpu_kernels` (skip where it is not
    built) or through PyTorch's kernels only."""
    from keras_gemma.backends import cpu_kernels
    from keras_gemma.backends import torch_cpu

    if not native:
        monkeypatch.setattr(cpu_kernels, "prepare", lambda *args: None)
    elif cpu_kernels._library() is None:
        pytest.skip("cpu_kernels is not built here (no AVX2 + FMA or no C compiler)")
    else:  # bfloat16 weights too, whatever this CPU prefers
        monkeypatch.setattr(torch_cpu, "_cpu_has_bfloat16_instructions", lambda: False)


@pytest.mark.parametrize("native_bfloat16", [True, False])
@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float_products_equal_float64_for_any_rows_and_kernel(
    monkeypatch, dtype, onednn, native_bfloat16
):
    """PyTorch's kernels, where `cpu_kernels` (tested on its own) does not apply."""
    import torch

    from keras_gemma.backends import torch_cpu as torch_decoding

    if onednn and not torch_decoding._has_onednn_linear():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setattr(torch_decoding, "_has_onednn_linear", lambda: onednn)
    monkeypatch.setattr(torch_decoding, "_cpu_has_bfloat16_instructions", lambda: native_bfloat16)
    # Without bfloat16 instructions, low precision from 6 rows on goes through
    # float32 pieces: 5 kernel rows each here, seven full pieces and a ragged
    # last one.
    monkeypatch.setattr(torch_decoding, "_FLOAT32_PIECE", 5 * 40)
    rng = np.random.default_rng(0)
    weight = torch.from_numpy(rng.standard_normal((37, 40))).to(getattr(torch, dtype))
    x = torch.from_numpy(rng.standard_normal((20, 3, 40))).to(getattr(torch, dtype))
    expected = x.double().numpy() @ weight.double().numpy().T
    tolerance = 1e-5 if dtype == "float32" else 1e-2
    # Many rows, a few, one, and one that is a strided view (a batch's last position).
    for rows, want in (
        (x[:, 0], expected[:, 0]),
        (x[:3, 0], expected[:3, 0]),
        (x[:1, 0], expected[:1, 0]),
        (x[:, -1][:1], expected[:1, -1]),
    ):
        result = torch_decoding._linear(rows, weight)
        assert result.dtype == weight.dtype
        np.testing.assert_allclose(
            result.double().numpy(), want, atol=tolerance * np.abs(want).max()
        )


def test_bfloat16_weights_use_pytorch_products_where_the_cpu_has_bfloat16(monkeypatch):
    from keras_gemma.backends import torch_cpu

    lm = _prepare("bfloat16")
    for native_bfloat16 in (True, False):
        prefers = native_bfloat16
        monkeypatch.setattr(torch_cpu, "_cpu_has_bfloat16_instructions", lambda p=prefers: p)
        decoder = torch_cpu.Decoder(lm.backbone)
        assert (decoder.blocks[0].query_key_value.native is None) == native_bfloat16
    # int8 weights keep the kernel (it streams them faster than PyTorch's).
    int8 = torch_cpu.Decoder(_prepare("bfloat16_int8").backbone)
    assert int8.blocks[0].query_key_value.native is not None or not _kernel_built()


def _kernel_built():
    from keras_gemma.backends import cpu_kernels

    return cpu_kernels._library() is not None
