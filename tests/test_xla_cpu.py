"""JAX's CPU low-precision rewrite computes what the plain program does."""

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax", reason="backends.xla_cpu rewrites JAX programs"
)

# A decode step's products (one row: tall, wide, as either operand), a
# prefill's (several rows) and attention's (batch axes).
CASES = [
    ("btd,nhd->btnh", (1, 1, 8), (2, 3, 8)),
    ("btd,fd->btf", (1, 1, 8), (40, 8)),
    ("vd,bd->bv", (40, 8), (1, 8)),
    ("btm,dm->btd", (1, 1, 6), (8, 6)),
    ("btd,fd->btf", (2, 3, 8), (40, 8)),
    ("bqkh,bskh->bkqs", (1, 2, 1, 4), (1, 5, 1, 4)),
]


@pytest.mark.parametrize("equation, x_shape, w_shape", CASES)
def test_products_equal_float64_within_bfloat16_rounding(equation, x_shape, w_shape):
    import jax
    import jax.numpy as jnp

    from keras_gemma.backends.xla_cpu import accumulate_in_float32

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.bfloat16)
    ours = jax.jit(accumulate_in_float32(lambda x, w: jnp.einsum(equation, x, w)))(x, w)
    expected = np.einsum(equation, np.asarray(x, np.float64), np.asarray(w, np.float64))
    assert ours.dtype == jnp.bfloat16 and ours.shape == expected.shape
    # One bfloat16 rounding of a float32 sum: at most 2^-8 of the largest.
    error = np.abs(np.asarray(ours, np.float64) - expected).max()
    assert error <= 2**-8 * np.abs(expected).max()


def test_loops_are_rewritten_and_keep_their_results():
    import jax
    import jax.numpy as jnp

    from keras_gemma.backends.xla_cpu import accumulate_in_float32

    def decode(w, x):
        step = lambda i, x: jnp.tanh(jnp.einsum("btd,fd->btf", x, w)[..., :8])  # noqa: E731
        return jax.lax.fori_loop(0, 3, step, x)

    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((40, 8)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((1, 1, 8)), jnp.bfloat16)
    rewritten = accumulate_in_float32(decode)
    program = str(jax.make_jaxpr(rewritten)(w, x))
    assert "optimization_barrier" in program  # the tall one-row product, multiply-reduced
    np.testing.assert_allclose(
        np.asarray(jax.jit(rewritten)(w, x), np.float32),
        np.asarray(jax.jit(decode)(w, x), np.float32),
        atol=2e-2,
    )
