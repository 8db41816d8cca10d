"""LoRA's arithmetic on a one-block backbone, fast enough for the mutation subset.

The update is `(lora_alpha / rank) * a @ b` on the stored kernel; merging
folds exactly that in; the file round trip and the older-format conversion
keep every update. The expected values are computed here in NumPy.
"""

import keras
import numpy as np
import pytest
from conftest import make_backbone
from helpers import to_numpy

from keras_gemma import internals
from keras_gemma import lora
from keras_gemma.layers.projection import project
from keras_gemma.layers.projection import projection
from keras_gemma.layers.projection import quantization_config

TARGETS = ("query", "attention_output", "ffw_linear")


def _tiny():
    return make_backbone("gqa", num_layers=1)


def _adapted(rank=2, alpha=6.0, seed=0):
    """A backbone with non-zero adapters on `TARGETS` (Keras starts `b` at zero)."""
    backbone = _tiny()
    backbone.enable_lora(rank, target_layer_names=list(TARGETS), lora_alpha=alpha)
    rng = np.random.default_rng(seed)
    for variable in backbone.trainable_weights:
        variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
    return backbone


def _layers(backbone):
    block = backbone.transformer_layers[0]
    return {
        "query": block.attention.query_dense,
        "attention_output": block.attention.output_dense,
        "ffw_linear": block.feed_forward.ffw_linear,
    }


def test_rank_and_alpha_boundaries():
    backbone = _tiny()  # each refusal comes before any change to it
    for rank in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="`rank` must be a positive integer"):
            backbone.enable_lora(rank)
    for alpha in (0, -2.0, "8"):
        with pytest.raises(ValueError, match="`lora_alpha` must be a positive number"):
            backbone.enable_lora(2, lora_alpha=alpha)
    assert lora.lora_state(backbone) is None
    backbone.enable_lora(1)  # the smallest rank is allowed; alpha defaults to it
    assert lora.lora_state(backbone) == (1, 1.0, lora.DEFAULT_TARGETS)
    rank_two = _tiny()
    rank_two.enable_lora(2)
    assert lora.lora_state(rank_two) == (2, 2.0, lora.DEFAULT_TARGETS)
    # Only weight-only int8 on torch is refused before `fit`; a float base trains.
    lora.check_trainable_through_int8(backbone)


def test_adapted_projection_and_merge_add_alpha_over_rank_a_b():
    backbone = _adapted(rank=2, alpha=6.0)  # scale 3
    rng = np.random.default_rng(1)
    expected = {}
    for name, layer in _layers(backbone).items():
        kernel = to_numpy(internals.stored_kernel(layer))
        a, b = to_numpy(layer.lora_kernel_a), to_numpy(layer.lora_kernel_b)
        assert a.shape == kernel.shape[:-1] + (2,) and b.shape == (2, kernel.shape[-1])
        expected[name] = kernel + 3.0 * (a @ b)
        x = rng.normal(size=(2, 3, kernel.shape[-1])).astype("float32")  # kernels are [out, in]
        np.testing.assert_allclose(
            to_numpy(layer(x)), np.einsum(layer.equation, x, expected[name]), atol=1e-5
        )
    backbone.merge_lora()
    assert lora.lora_state(backbone) is None
    for name, layer in _layers(backbone).items():
        assert not layer.lora_enabled
        np.testing.assert_allclose(
            to_numpy(internals.stored_kernel(layer)), expected[name], atol=1e-6
        )


def test_save_then_load_restores_every_adapter(tmp_path):
    backbone = _adapted(rank=3, alpha=4.0)
    path = tmp_path / "adapters.safetensors"
    backbone.save_lora_weights(path)
    saved = lora.lora_weights(backbone)
    assert len(saved) == 2 * len(TARGETS)
    # Onto a backbone without LoRA (enabled from the file), and onto one
    # with matching adapters already enabled.
    matching = _tiny()
    matching.enable_lora(3, target_layer_names=list(TARGETS), lora_alpha=4.0)
    for fresh in (_tiny(), matching):
        fresh.load_lora_weights(path)
        assert lora.lora_state(fresh) == (3, 4.0, TARGETS)
        loaded = lora.lora_weights(fresh)
        assert sorted(loaded) == sorted(saved)
        for name in saved:
            np.testing.assert_array_equal(loaded[name], saved[name])


def test_older_format_updates_are_the_transposes_of_todays():
    """Versions 1 and 2 stored `a @ b` for `[in, out]`-like kernels: the
    converted pair gives the transpose of that update (the attention output's
    for both versions, the feed-forward's for version 1 only)."""
    rng = np.random.default_rng(2)
    heads, head_dim, hidden, ffw, r = 2, 4, 8, 6, 3
    old = {
        "decoder_block_0/attention/attention_output/lora_kernel_a": rng.normal(
            size=(heads, head_dim, r)
        ),
        "decoder_block_0/attention/attention_output/lora_kernel_b": rng.normal(size=(r, hidden)),
        "decoder_block_0/feed_forward/ffw_linear/lora_kernel_a": rng.normal(size=(ffw, r)),
        "decoder_block_0/feed_forward/ffw_linear/lora_kernel_b": rng.normal(size=(r, hidden)),
    }

    def update(tensors, layer):
        a, b = tensors[f"{layer}/lora_kernel_a"], tensors[f"{layer}/lora_kernel_b"]
        return np.reshape(a, (-1, r)) @ b

    output, linear = (
        "decoder_block_0/attention/attention_output",
        "decoder_block_0/feed_forward/ffw_linear",
    )
    for version in ("1", "2"):
        new = lora._from_older_version("old.safetensors", version, dict(old))
        assert sorted(new) == sorted(old)
        np.testing.assert_allclose(update(new, output), update(old, output).T, atol=1e-12)
        assert new[f"{output}/lora_kernel_a"].shape == (hidden, r)
        if version == "1":
            np.testing.assert_allclose(update(new, linear), update(old, linear).T, atol=1e-12)
        else:  # version 2 already had `[out, in]` feed-forward kernels
            for leaf in ("lora_kernel_a", "lora_kernel_b"):
                np.testing.assert_array_equal(new[f"{linear}/{leaf}"], old[f"{linear}/{leaf}"])
    query = {
        "decoder_block_0/attention/query/lora_kernel_a": np.zeros((heads, hidden, r)),
        "decoder_block_0/attention/query/lora_kernel_b": np.zeros((r, head_dim)),
    }
    with pytest.raises(ValueError, match="query adapters"):
        lora._from_older_version("old.safetensors", "2", query)


@pytest.mark.parametrize(
    "equation, output_shape, input_dim",
    [("btd,nhd->btnh", (None, 2, 4), 8), ("btm,dm->btd", (None, 8), 12)],
    ids=["query", "attention_output"],
)
def test_update_on_an_int8_kernel_is_alpha_over_rank_a_b(equation, output_shape, input_dim):
    # `project` computes the update itself on a quantized kernel (Keras's
    # quantized call assumes the kernel's last axis is an output axis).
    layer = projection(
        equation,
        output_shape,
        keras.initializers.GlorotUniform(seed=1),
        keras.dtype_policies.get("float32"),
        "q",
    )
    layer.build((None, None, input_dim))
    layer.quantize("int8", config=quantization_config("int8"))
    layer.enable_lora(2, lora_alpha=6.0)
    rng = np.random.default_rng(3)
    a = rng.normal(0, 0.3, layer.lora_kernel_a.shape).astype("float32")
    b = rng.normal(0, 0.3, layer.lora_kernel_b.shape).astype("float32")
    layer.lora_kernel_a.assign(a)
    layer.lora_kernel_b.assign(b)
    x = rng.normal(size=(2, 3, input_dim)).astype("float32")
    update = to_numpy(project(layer, x)) - to_numpy(internals.call_without_lora(layer, x))
    np.testing.assert_allclose(update, 3.0 * np.einsum(equation, x, a @ b), atol=1e-4)
