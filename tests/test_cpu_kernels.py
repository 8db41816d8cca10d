"""The AVX2 decode-step kernel equals float64 products, and falls back cleanly."""

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "torch", reason="cpu_kernels serves the torch backend's decoding"
)


def _kernel_or_skip():
    from keras_gemma.backends import cpu_kernels

    if cpu_kernels._library() is None:
        pytest.skip("no AVX2 + FMA or no C compiler here")
    return cpu_kernels


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("in_dim", [64, 75])  # 75: tails past the 16- and 32-wide bodies
@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
def test_matvec_equals_float64(monkeypatch, weights, in_dim, threads):
    import torch

    cpu_kernels = _kernel_or_skip()
    # Tiny matrices still split: 37 rows over 3 threads.
    monkeypatch.setattr(cpu_kernels, "_BYTES_PER_THREAD", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    rng = np.random.default_rng(0)
    if weights == "int8":
        weight = torch.from_numpy(rng.integers(-127, 128, (37, in_dim), dtype=np.int8))
        scale = torch.from_numpy(rng.uniform(0.01, 0.02, 37)).to(torch.bfloat16)
    else:
        weight = torch.from_numpy(rng.standard_normal((37, in_dim))).to(getattr(torch, weights))
        scale = None
    rows = torch.from_numpy(rng.standard_normal((cpu_kernels.MAX_ROWS, in_dim)))
    # 1 to 7 rows are each of the kernel's row groups (4, 3, 2, 1, and
    # a 4 then the rest); bfloat16 rows, and float32 rows in a strided view.
    for count in (*range(1, 8), cpu_kernels.MAX_ROWS):
        for x in (rows[:count].to(torch.bfloat16), rows.float().T[:, :count].T):
            expected = x.double() @ weight.double().T
            if scale is not None:
                expected = expected * scale.double()
            result = cpu_kernels.matvec(x, weight, scale)
            assert result.dtype == x.dtype and tuple(result.shape) == (count, 37)
            tolerance = 1e-5 if x.dtype == torch.float32 else 1e-2  # bf16 result
            np.testing.assert_allclose(
                result.double().numpy(),
                expected.numpy(),
                atol=tolerance * expected.abs().max().item(),
            )


def test_matvec_declines_what_it_does_not_compute():
    import torch

    cpu_kernels = _kernel_or_skip()
    weight = torch.ones(8, 32, dtype=torch.bfloat16)
    assert cpu_kernels.matvec(torch.ones(cpu_kernels.MAX_ROWS + 1, 32), weight) is None
    assert cpu_kernels.matvec(torch.ones(1, 32), weight.half()) is None  # no kernel
    assert cpu_kernels.matvec(torch.ones(1, 16), weight[:, ::2]) is None  # not contiguous


def _declines_with_one_warning(cpu_kernels, match):
    """Every entry point returns None, after one warning matching `match`."""
    import torch

    cache = torch.zeros(1, 4, 1, 8)
    attend_args = (torch.ones(1, 8),) * 3 + (torch.ones(8), torch.zeros(8), 1.0, cache, cache, 1)
    cpu_kernels._library.cache_clear()
    try:
        with pytest.warns(UserWarning, match=match) as caught:
            assert cpu_kernels.matvec(torch.ones(1, 32), torch.ones(8, 32).bfloat16()) is None
            assert cpu_kernels.prepare([torch.ones(8, 32)]) is None
            assert cpu_kernels.attend(*attend_args) is None
        assert len(caught) == 1 and "KERAS_GEMMA_NATIVE=0" in str(caught[0].message)
    finally:
        cpu_kernels._library.cache_clear()


def test_without_a_compiler_it_warns_once_and_declines(monkeypatch, tmp_path):
    from keras_gemma.backends import cpu_kernels

    if not cpu_kernels._cpu_has_avx2_and_fma():
        pytest.skip("the kernel is never built on this CPU")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("KERAS_GEMMA_CACHE", str(tmp_path))
    _declines_with_one_warning(cpu_kernels, "install a C compiler")
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind


def test_without_avx2_and_fma_it_warns_once_and_declines(monkeypatch):
    from keras_gemma.backends import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "_cpu_has_avx2_and_fma", lambda: False)
    monkeypatch.setattr(cpu_kernels, "_build", lambda: pytest.fail("built without AVX2"))
    _declines_with_one_warning(cpu_kernels, "AVX2 and FMA")


def test_with_another_openmp_runtime_than_pytorchs_it_warns_once_and_declines(monkeypatch):
    from keras_gemma.backends import cpu_kernels

    _kernel_or_skip()
    # Each library seen to resolve OpenMP's functions to a runtime of its own.
    monkeypatch.setattr(cpu_kernels, "_openmp_runtime", id)
    _declines_with_one_warning(cpu_kernels, "OpenMP runtime")


def test_it_runs_on_pytorchs_openmp_runtime():
    import ctypes

    import torch

    cpu_kernels = _kernel_or_skip()
    ours = cpu_kernels._openmp_runtime(cpu_kernels._build())
    assert ours is not None and ours == cpu_kernels._openmp_runtime(ctypes.CDLL(torch._C.__file__))


def test_builds_once_into_the_cache(monkeypatch, tmp_path):
    import torch

    from keras_gemma.backends import cpu_kernels

    _kernel_or_skip()
    monkeypatch.setenv("KERAS_GEMMA_CACHE", str(tmp_path))
    cpu_kernels._library.cache_clear()
    try:
        y = cpu_kernels.matvec(torch.ones(1, 32), torch.ones(8, 32).bfloat16())
        np.testing.assert_array_equal(y.numpy(), np.full((1, 8), 32.0))
        (built,) = tmp_path.iterdir()
        assert built.name.startswith("cpu_kernels-")
        modified = built.stat().st_mtime_ns
        cpu_kernels._library.cache_clear()
        products = cpu_kernels.prepare([torch.ones(8, 32).bfloat16()])
        assert list(tmp_path.iterdir()) == [built] and built.stat().st_mtime_ns == modified
        # The C file's limits are Python's, fixed at the build: past them the
        # C declines by itself, and other limits build a library of their own.
        monkeypatch.setattr(cpu_kernels, "MAX_ROWS", cpu_kernels.MAX_ROWS * 2)
        assert products(torch.ones(cpu_kernels.MAX_ROWS, 32)) is None
        cpu_kernels._library.cache_clear()
        y = cpu_kernels.matvec(torch.ones(cpu_kernels.MAX_ROWS, 32), torch.ones(8, 32).bfloat16())
        assert y.shape == (cpu_kernels.MAX_ROWS, 8) and len(list(tmp_path.iterdir())) == 2
    finally:
        cpu_kernels._library.cache_clear()


def test_a_build_without_the_limits_fails_loudly():
    import os
    import subprocess

    cpu_kernels = _kernel_or_skip()
    flags = [flag for flag in cpu_kernels._flags() if not flag.startswith("-DMAX_")]
    compiler = os.environ.get("CC", "cc")
    built = subprocess.run(
        [compiler, *flags, "-fsyntax-only", str(cpu_kernels._SOURCE)], capture_output=True
    )
    assert built.returncode != 0 and b"#error" in built.stderr


def test_turned_off_by_the_environment_silently(monkeypatch):
    import warnings

    from keras_gemma.backends import cpu_kernels

    monkeypatch.setenv("KERAS_GEMMA_NATIVE", "0")
    monkeypatch.setattr(cpu_kernels, "_build", lambda: pytest.fail("built though turned off"))
    cpu_kernels._library.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert cpu_kernels._library() is None
    finally:
        cpu_kernels._library.cache_clear()


def test_a_failing_compiler_is_quoted(monkeypatch, tmp_path):
    from keras_gemma.backends import cpu_kernels

    if not cpu_kernels._cpu_has_avx2_and_fma():
        pytest.skip("the kernel is never built on this CPU")
    compiler = tmp_path / "cc"
    compiler.write_text("#!/bin/sh\necho 'cc: fatal error: no OpenMP here' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("KERAS_GEMMA_CACHE", str(tmp_path / "cache"))
    _declines_with_one_warning(cpu_kernels, "no OpenMP here")
    assert list((tmp_path / "cache").iterdir()) == []


def test_the_binding_checks_each_calls_count_and_types():
    import ctypes

    library = _kernel_or_skip()._library()
    # No matrices (no batch): were a check to fail, the C would return -1
    # before reading any pointer. Wrong arguments by position: a float for
    # an int, a string for a float, and a bare address where matvec takes an
    # array of pointers, or a float for a pointer and for an int64.
    calls = {
        "matvec_bf16": (
            [None, 1, None, None, 0.0, 0, None, None, None, None, None, 32, 1, 1],
            {1: 1.5, 4: "0.0", 6: 12345},
        ),
        "attend_f32": ([None] * 5 + [1.0, None, None, 0, 4, 0, 1, 1, 8, None, 1], {0: 1.5, 8: 0.5}),
    }
    for name, (args, wrongs) in calls.items():
        function = library[name]
        assert function(*args) == -1
        with pytest.raises(TypeError, match="arguments"):  # ctypes' own count check
            function(*args[:-1])
        with pytest.raises(TypeError, match="arguments"):
            function(*args, 1)
        for index, wrong in wrongs.items():
            with pytest.raises(ctypes.ArgumentError):
                function(*args[:index], wrong, *args[index + 1 :])


@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_products_of_several_matrices_equal_one_at_a_time(monkeypatch, weights):
    import torch

    cpu_kernels = _kernel_or_skip()
    monkeypatch.setattr(cpu_kernels, "_BYTES_PER_THREAD", 1)  # rows split across threads
    rng = np.random.default_rng(1)
    # A layer's query, key and value: the threads' rows span all three.
    if weights == "int8":
        matrices = [
            torch.from_numpy(rng.integers(-127, 128, (n, 48), dtype=np.int8)) for n in (32, 8, 8)
        ]
        scales = [torch.from_numpy(rng.uniform(0.01, 0.02, len(m))).float() for m in matrices]
    else:
        matrices = [torch.from_numpy(rng.standard_normal((n, 48))).float() for n in (32, 8, 8)]
        scales = [None, None, None]
    products = cpu_kernels.prepare(matrices, scales)
    for rows in (1, 5):
        x = torch.from_numpy(rng.standard_normal((rows, 48))).to(torch.bfloat16)
        together = products(x)
        singly = [cpu_kernels.matvec(x, m, s) for m, s in zip(matrices, scales)]
        for ours, theirs in zip(together, singly):
            assert ours.dtype == torch.bfloat16
            assert torch.equal(ours, theirs)
    assert cpu_kernels.prepare([matrices[0], matrices[1].T.contiguous()]) is None  # other `in`
    assert products(torch.ones(1, 47)) is None


def test_bfloat16_results_round_to_nearest_even_as_pytorch_does():
    import torch

    cpu_kernels = _kernel_or_skip()
    # Exact float32 sums halfway between two bfloat16 values, and a NaN.
    weight = torch.tensor([[1 + 2**-8], [1 + 3 * 2**-8], [-(1 + 2**-8)], [float("nan")]])
    y = cpu_kernels.matvec(torch.ones(1, 1, dtype=torch.bfloat16), weight)
    expected = weight.T.to(torch.bfloat16)
    assert expected[0, :3].tolist() == [1.0, 1.015625, -1.0]
    assert torch.equal(y[:, :3], expected[:, :3])
    assert y[0, 3].isnan()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_products_of_rms_normalized_rows_equal_float64(dtype):
    import torch

    cpu_kernels = _kernel_or_skip()
    rng = np.random.default_rng(2)
    weight = torch.from_numpy(rng.standard_normal((24, 75))).to(torch.bfloat16)
    norm = torch.from_numpy(1 + rng.standard_normal(75)).float()
    x = torch.from_numpy(rng.standard_normal((3, 75)) * 40).to(getattr(torch, dtype))
    (y,) = cpu_kernels.prepare([weight])(x, norm, 1e-6)
    rows = x.double()
    normalized = rows / torch.sqrt(rows.square().mean(-1, keepdim=True) + 1e-6) * norm.double()
    # The layer rounds its output to the compute dtype before the product.
    expected = normalized.to(x.dtype).double() @ weight.double().T
    tolerance = 1e-5 if dtype == "float32" else 1e-2  # bf16 result
    assert y.dtype == x.dtype
    np.testing.assert_allclose(
        y.double().numpy(), expected.numpy(), atol=tolerance * expected.abs().max().item()
    )
    assert cpu_kernels.prepare([weight])(x, norm[:-1], 1e-6) is None  # the norm's length


def test_int8_weights_take_bfloat16_rows_with_infinities_in_floats():
    import torch

    cpu_kernels = _kernel_or_skip()
    weight = torch.from_numpy(np.random.default_rng(3).integers(-127, 128, (8, 64), dtype=np.int8))
    x = torch.ones(2, 64, dtype=torch.bfloat16)
    x[0, 5] = float("inf")  # no int16 scale for this row: the float path
    y = cpu_kernels.matvec(x, weight)
    expected = cpu_kernels.matvec(x.float(), weight).to(torch.bfloat16)
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.isinf(), expected.isinf())
    assert y[0].isinf().any() and torch.equal(y[1], expected[1])


def _rotary_float64(x, position, h):
    """`x` `[..., h]` rotated by the position's angles, in the paper's form."""
    angles = position * 10000.0 ** (-np.arange(0, h, 2) / h)
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    cos, sin = np.cos(angles), np.sin(angles)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("head_dim", [8, 12])  # 12: tails past the 8-wide body
@pytest.mark.parametrize("heads, kv_heads", [(4, 1), (4, 2), (4, 4)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attention_of_one_position_equals_float64(
    monkeypatch, dtype, heads, kv_heads, head_dim, threads
):
    import torch

    cpu_kernels = _kernel_or_skip()
    monkeypatch.setattr(cpu_kernels, "_ATTENTION_WORK_PER_THREAD", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    rows, max_length, h = 2, 7, head_dim
    dtype = getattr(torch, dtype)
    rng = np.random.default_rng(heads + kv_heads + h)
    for position in (0, 4):
        caches = [torch.from_numpy(rng.standard_normal((rows, max_length, kv_heads, h))).to(dtype)]
        caches.append(torch.from_numpy(rng.standard_normal(caches[0].shape)).to(dtype))
        before = [c.clone() for c in caches]
        query, key, value = (
            torch.from_numpy(rng.standard_normal((rows, n * h))).to(dtype)
            for n in (heads, kv_heads, kv_heads)
        )
        angles = position * (1.0 / 10000.0 ** (torch.arange(0, h, 2).float() / h))
        cos = torch.cat([angles.cos(), angles.cos()])
        sin = torch.cat([-angles.sin(), angles.sin()])
        out = cpu_kernels.attend(query, key, value, cos, sin, 0.5, *caches, position)

        q = _rotary_float64(query.double().numpy().reshape(rows, heads, h), position, h) * 0.5
        k = _rotary_float64(key.double().numpy().reshape(rows, kv_heads, h), position, h)
        v = value.double().numpy().reshape(rows, kv_heads, h)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        key_cache, value_cache = (c.double().numpy() for c in caches)
        np.testing.assert_allclose(key_cache[:, position], k, atol=tolerance * np.abs(k).max())
        np.testing.assert_array_equal(value_cache[:, position], v)
        for written, original in zip(caches, before):  # no other slot changes
            written[:, position] = original[:, position]
            assert torch.equal(written, original)
        key_cache[:, position], value_cache[:, position] = k, v
        group = np.arange(heads) // (heads // kv_heads)  # each query head's key head
        keys = key_cache[:, : position + 1][:, :, group]  # [rows, s, heads, h]
        values = value_cache[:, : position + 1][:, :, group]
        logits = np.einsum("rnh,rsnh->rns", q, keys)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        expected = np.einsum("rns,rsnh->rnh", weights, values).reshape(rows, heads * h)
        assert out.dtype == dtype and tuple(out.shape) == (rows, heads * h)
        np.testing.assert_allclose(
            out.double().numpy(), expected, atol=tolerance * np.abs(expected).max()
        )


def test_attention_declines_what_it_does_not_compute():
    import torch

    cpu_kernels = _kernel_or_skip()
    cache = torch.zeros(1, 4, 1, 8)
    rows = torch.ones(1, 8)
    angles = (torch.ones(8), torch.zeros(8), 1.0)
    for args in (
        (rows.bfloat16(), rows, rows, *angles, cache, cache.clone(), 1),  # mixed dtypes
        (rows.half(), rows.half(), rows.half(), *angles, cache.half(), cache.half(), 1),
        (rows, rows, rows, *angles, cache, cache.clone(), 4),  # past the cache
        (rows, rows, rows, *angles, cache.transpose(1, 2), cache.clone(), 1),  # a strided view
        (rows, rows, rows, torch.ones(4), torch.zeros(4), 1.0, cache, cache.clone(), 1),
    ):
        assert cpu_kernels.attend(*args) is None
    assert not cache.any()  # nothing written


def _geglu_float64(gate, up, dtype):
    """GeGLU's hidden rows as the model rounds them: the GELU, then its product."""
    import math

    g = gate.double()
    gelu = 0.5 * g * (1 + (math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)).tanh())
    return (gelu.to(dtype).double() * up.double()).to(dtype).double()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_geglu_rows_equal_float64(dtype):
    import torch

    cpu_kernels = _kernel_or_skip()
    rng = np.random.default_rng(3)
    dtype = getattr(torch, dtype)
    # Gates from -12 to 12 (both tails of the GELU and its middle); an
    # identity weight, so the results are the rows themselves.
    gate = torch.from_numpy(rng.uniform(-12, 12, (3, 75))).to(dtype)
    up = torch.from_numpy(rng.standard_normal((3, 75))).to(dtype)
    (y,) = cpu_kernels.prepare([torch.eye(75, dtype=dtype)])(gate, up=up)
    expected = _geglu_float64(gate, up, dtype).numpy()
    # float32: a few ulp; bfloat16: the same values but for a rare rounding
    # tie. The far negative tail (|gelu| < 1e-6 of the largest) cancels in
    # float32 for PyTorch's formula as well, so it gets an absolute bound.
    tolerance = 1e-6 if dtype == torch.float32 else 2**-8
    atol = 1e-6 * np.abs(expected).max()
    np.testing.assert_allclose(y.double().numpy(), expected, rtol=tolerance, atol=atol)


def test_a_residual_adds_the_rounded_product_as_the_model_does():
    import torch

    cpu_kernels = _kernel_or_skip()
    rng = np.random.default_rng(4)
    # Small integers: float32 sums are exact, so only the roundings differ.
    weight = torch.from_numpy(rng.integers(-8, 9, (24, 75)).astype("float32")).bfloat16()
    x = torch.from_numpy(rng.integers(-8, 9, (3, 75)).astype("float32")).bfloat16()
    residual = torch.from_numpy(rng.standard_normal((3, 24)) * 3).bfloat16()
    (y,) = cpu_kernels.prepare([weight])(x, residual=residual)
    product = (x.double() @ weight.double().T).bfloat16()  # rounded, then added
    assert torch.equal(y, (residual.double() + product.double()).bfloat16())


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_products_of_geglu_rows_plus_a_residual_equal_float64(dtype, weights):
    import torch

    cpu_kernels = _kernel_or_skip()
    rng = np.random.default_rng(3)
    dtype = getattr(torch, dtype)
    if weights == "int8":
        weight = torch.from_numpy(rng.integers(-127, 128, (24, 75), dtype=np.int8))
    else:
        weight = torch.from_numpy(rng.standard_normal((24, 75))).to(getattr(torch, weights))
    gate = torch.from_numpy(rng.uniform(-12, 12, (3, 75))).to(dtype)
    up = torch.from_numpy(rng.standard_normal((3, 75))).to(dtype)
    residual = torch.from_numpy(rng.standard_normal((3, 24))).to(dtype)
    products = cpu_kernels.prepare([weight])
    (y,) = products(gate, up=up, residual=residual)
    product = (_geglu_float64(gate, up, dtype) @ weight.double().T).to(dtype).double()
    expected = residual.double() + product
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 result
    assert y.dtype == dtype
    np.testing.assert_allclose(
        y.double().numpy(), expected.numpy(), atol=tolerance * expected.abs().max().item()
    )
    assert products(gate, up=up[:, :-1]) is None  # shapes that do not match
    assert products(gate, residual=residual[:, :-1]) is None
    assert products(gate, up=up.half()) is None  # nor dtypes
    assert cpu_kernels.prepare([weight, weight])(gate, residual=residual) is None  # two outputs
