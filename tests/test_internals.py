"""The Keras and PyTorch internals in `keras_gemma.internals`, one test each.

Each test checks the behaviour keras_gemma relies on, so an upgrade that
renames or changes an internal fails here, by name. The PyTorch ones run on
the torch backend only. The last test keeps such uses in `internals.py`.
"""

import ast
import pathlib

import keras
import numpy as np
import pytest
from helpers import to_numpy

from keras_gemma import internals
from keras_gemma.layers.projection import quantization_config

torch_only = pytest.mark.skipif(
    keras.config.backend() != "torch", reason="PyTorch internals, used on the torch backend"
)


def _stateless_dense():
    """A built `Dense` whose variables are made but not allocated."""
    layer = keras.layers.Dense(3)
    with keras.StatelessScope(initialize_variables=False):
        layer.build((None, 2))
    return layer


def test_variables_of_a_stateless_scope_initialize_one_at_a_time():
    layer = _stateless_dense()
    try:
        assert internals.supports_deferred_initialization(layer.weights), (
            "Keras no longer defers variables made in StatelessScope(initialize_variables="
            "False) the way `supports_deferred_initialization` expects; preset loading "
            "would fall back to allocating random weights first."
        )
        calls = []

        def initializer(shape, dtype):
            calls.append((tuple(shape), str(dtype)))
            return np.full(shape, 7.0, "float32")

        internals.initialize_deferred(layer.kernel, initializer)
        assert calls == [((2, 3), "float32")]
        np.testing.assert_array_equal(to_numpy(layer.kernel), np.full((2, 3), 7.0))
        # The other variable is still unallocated; allocated ones are not deferred.
        assert internals.supports_deferred_initialization([layer.bias])
        assert not internals.supports_deferred_initialization([layer.kernel])
        built = keras.layers.Dense(2)
        built.build((None, 2))
        assert not internals.supports_deferred_initialization(built.weights)
    finally:
        internals.forget_uninitialized_variables(layer.weights)


def test_forgotten_variables_are_left_alone_by_later_scopes():
    from keras.src.backend.common import global_state

    layer = _stateless_dense()
    try:
        registered = global_state.get_global_attribute("uninitialized_variables") or []
        assert any(v is layer.kernel for v in registered), (
            "Keras no longer lists deferred variables under the global attribute "
            "'uninitialized_variables'; update `forget_uninitialized_variables`."
        )
        for variable in layer.weights:
            internals.initialize_deferred(variable, lambda shape, dtype: np.ones(shape, "float32"))
    finally:
        internals.forget_uninitialized_variables(layer.weights)
    registered = global_state.get_global_attribute("uninitialized_variables") or []
    assert not any(v is layer.kernel or v is layer.bias for v in registered)
    # Otherwise the next stateless scope to exit would initialize them again
    # (and raise: "already initialized").
    with keras.StatelessScope():
        pass
    np.testing.assert_array_equal(to_numpy(layer.kernel), np.ones((2, 3)))


def _einsum_dense(quantize=None, lora_rank=None):
    layer = keras.layers.EinsumDense("ab,cb->ac", output_shape=(6,), name="projection")
    layer.build((None, 4))
    layer.kernel.assign(np.random.default_rng(0).normal(size=(6, 4)).astype("float32"))
    if quantize:
        layer.quantize(quantize)
    if lora_rank:
        layer.enable_lora(lora_rank)
        layer.lora_kernel_b.assign(np.full(layer.lora_kernel_b.shape, 0.5, "float32"))
    return layer


def test_stored_kernel_is_the_variable_without_lora():
    layer = _einsum_dense(lora_rank=2)
    stored = internals.stored_kernel(layer)
    assert any(stored is v for v in layer.weights) and stored.name == "kernel"
    update = to_numpy(layer.lora_kernel_a) @ to_numpy(layer.lora_kernel_b)
    assert np.abs(update).max() > 0
    np.testing.assert_allclose(to_numpy(layer.kernel), to_numpy(stored) + update, atol=1e-6)

    quantized = _einsum_dense(quantize="int8")
    stored = internals.stored_kernel(quantized)
    assert any(stored is v for v in quantized.weights)
    assert keras.backend.standardize_dtype(stored.dtype) == "int8"
    assert tuple(stored.shape) == (6, 4)


def test_stored_embeddings_is_the_variable_without_lora():
    embedding = keras.layers.ReversibleEmbedding(10, 4, tie_weights=True)
    embedding.build((None, None))
    embedding.enable_lora(2)
    embedding.lora_embeddings_b.assign(np.full((2, 4), 0.5, "float32"))
    stored = internals.stored_embeddings(embedding)
    assert any(stored is v for v in embedding.weights) and stored.name == "embeddings"
    update = to_numpy(embedding.lora_embeddings_a) @ to_numpy(embedding.lora_embeddings_b)
    np.testing.assert_allclose(to_numpy(embedding.embeddings), to_numpy(stored) + update, atol=1e-6)

    quantized = keras.layers.ReversibleEmbedding(10, 4, tie_weights=True)
    quantized.build((None, None))
    quantized.quantize("int8")
    stored = internals.stored_embeddings(quantized)
    assert keras.backend.standardize_dtype(stored.dtype) == "int8"
    assert tuple(stored.shape) == (10, 4)
    assert tuple(quantized.embeddings_scale.shape) == (10,)


def test_kernel_with_merged_lora_requantizes_an_int8_kernel():
    layer = _einsum_dense(quantize="int8", lora_rank=2)
    kernel, scale, zero = internals.kernel_with_merged_lora(layer)
    assert zero is None
    kernel, scale = to_numpy(kernel), to_numpy(scale)
    assert kernel.dtype == np.int8 and kernel.shape == (6, 4)
    assert scale.shape == tuple(layer.kernel_scale.shape)
    # Keras's int8 `EinsumDense` stores `q = w * scale`, per output channel.
    before = to_numpy(internals.stored_kernel(layer)) / to_numpy(layer.kernel_scale).reshape(6, 1)
    update = to_numpy(layer.lora_kernel_a) @ to_numpy(layer.lora_kernel_b)
    merged = kernel / scale.reshape(6, 1)
    step = np.abs(before + update).max() / 127
    np.testing.assert_allclose(merged, before + update, atol=step)
    # A float layer's merge is its `kernel` property, with no scale.
    float_layer = _einsum_dense(lora_rank=2)
    kernel, scale, _ = internals.kernel_with_merged_lora(float_layer)
    assert scale is None
    np.testing.assert_allclose(to_numpy(kernel), to_numpy(float_layer.kernel), atol=1e-6)


def test_flatten_layers_reaches_every_nested_layer():
    inner = keras.layers.Dense(2, name="inner")

    class Block(keras.layers.Layer):
        def __init__(self):
            super().__init__(name="block")
            self.dense = inner
            self.others = [keras.layers.Dense(2, name="listed")]

    class Outer(keras.Model):
        def __init__(self):
            super().__init__(name="outer")
            self.block = Block()

    model = Outer()
    names = [layer.name for layer in internals.flatten_layers(model)]
    assert names[0] == "outer"
    assert sorted(names) == ["block", "inner", "listed", "outer"]


class _OneProjection(keras.Model):
    def __init__(self, weight_only_by_default):
        super().__init__()
        if weight_only_by_default:
            internals.default_quantization_config(self, quantization_config)
        self.projection = keras.layers.EinsumDense("ab,bc->ac", (3,))
        self.projection.build((None, 4))
        self.built = True

    def call(self, x):
        return self.projection(x)


def test_int8_quantize_defaults_to_weight_only():
    # Keras's own default quantizes activations too: what the function replaces.
    plain = _OneProjection(weight_only_by_default=False)
    plain.quantize("int8")
    assert plain.projection.inputs_quantizer is not None, (
        "Keras's default int8 config no longer quantizes activations; "
        "`default_quantization_config` may be unnecessary."
    )
    ours = _OneProjection(weight_only_by_default=True)
    ours.quantize("int8")
    assert ours.projection.quantization_mode == "int8"
    assert ours.projection.inputs_quantizer is None
    # An explicit config still wins.
    explicit = _OneProjection(weight_only_by_default=True)
    explicit.quantize("int8", config=keras.quantizers.Int8QuantizationConfig())
    assert explicit.projection.inputs_quantizer is not None


@torch_only
def test_onednn_linear():
    import torch

    if not torch.backends.mkldnn.is_available():
        pytest.skip("PyTorch built without oneDNN: `torch_cpu` uses `F.linear` instead")
    generator = torch.Generator().manual_seed(0)
    for rows in (1, 3):
        x = torch.randn(rows, 24, generator=generator)
        weight = torch.randn(40, 24, generator=generator)
        result = internals.onednn_linear(x, weight)
        assert result.shape == (rows, 40) and result.dtype == torch.float32
        torch.testing.assert_close(result, x @ weight.T, atol=1e-4, rtol=1e-5)


@torch_only
def test_int8pack_mm():
    import torch

    generator = torch.Generator().manual_seed(0)
    kernel = torch.randint(-127, 128, (48, 32), dtype=torch.int8, generator=generator)
    scale = (torch.rand(48, generator=generator) / 100 + 1e-3).to(torch.bfloat16)
    for rows in (1, 5):
        x = torch.randn(rows, 32, generator=generator).to(torch.bfloat16)
        result = internals.int8pack_mm(x, kernel, scale)
        assert result.shape == (rows, 48) and result.dtype == torch.bfloat16
        expected = (x.float() @ kernel.float().T) * scale.float()
        torch.testing.assert_close(result.float(), expected, atol=0.05, rtol=0.02)


@torch_only
def test_torch_extension_library():
    import ctypes

    import torch

    path = pathlib.Path(internals.torch_extension_library())
    assert path.is_file(), path
    library = ctypes.CDLL(str(path))
    # `cpu_kernels` compares the OpenMP runtime PyTorch resolves through it.
    if torch.backends.openmp.is_available():
        assert getattr(library, "omp_get_max_threads", None) is not None


# Only internals.py touches internals.


def _private_uses(tree):
    """`(line, expression)` of each private attribute read off another object:
    `x._name` (`x` not `self`, `cls` or `super()`) and `getattr(x, "_name")`."""

    def private(name):
        return name.startswith("_") and not name.startswith("__")

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            value = node.value
            if isinstance(value, ast.Name) and value.id in ("self", "cls"):
                continue
            if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "super":
                continue
            yield node.lineno, ast.unparse(node)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and private(node.args[1].value)
        ):
            yield node.lineno, ast.unparse(node)


def test_private_attributes_are_used_only_in_internals():
    root = pathlib.Path(__file__).resolve().parent.parent / "keras_gemma"
    found = []
    for path in sorted(root.rglob("*.py")):
        if path == root / "internals.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found += [
            f"{path.relative_to(root.parent)}:{line}: {use}" for line, use in _private_uses(tree)
        ]
    assert not found, (
        "Private attributes of other objects (Keras, PyTorch, or another module's) are "
        "used outside keras_gemma/internals.py; wrap each there, with a test here:\n"
        + "\n".join(found)
    )


def test_private_uses_are_found():
    tree = ast.parse(
        "self._a\ncls._b\nsuper()._c()\nlayer._kernel\ntorch.ops.aten._mm(x)\n"
        "getattr(v, '_value', 0)\nhasattr(v, 'public')\nx.__class__\n"
    )
    assert sorted(line for line, _ in _private_uses(tree)) == [4, 5, 6]
