"""The one module that branches on the Keras backend."""

import functools

import keras


def compile_stateless(fn, model, whole_loop=True):
    """Compiles `fn(*tensors)`, a pure function of `model`'s weights.

    JAX: `jax.jit` with the weights passed in as arguments, so new weight
    values (after `fit`, LoRA merges, quantization) never retrace.
    TensorFlow: a `tf.function`, compiled with XLA for a `whole_loop` (8x
    faster decoding here) but not for one streaming step, which XLA took
    ~20 s to compile on CPU for little gain. PyTorch: eager under
    `torch.no_grad()` (the decode loop is a Python loop there, over
    `keras_gemma.torch_decoding`).
    JAX and TensorFlow callers cache the result per set of model variables.
    """
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        variables = list(model.variables)

        @jax.jit
        def jitted(values, *args):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return fn(*args)

        return lambda *args: jitted([v.value for v in variables], *args)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(
            fn, jit_compile=whole_loop and _xla_helps_tensorflow(model.compute_dtype)
        )
    if backend == "torch":
        import torch

        def no_grad(*args):
            with torch.no_grad():
                return fn(*args)

        return no_grad
    return fn


def _xla_helps_tensorflow(compute_dtype):
    """Whether to compile TensorFlow's decode loop with XLA.

    It does for float32 (8x faster on the small benchmark config) and on
    accelerators. XLA's CPU backend computes bfloat16 dots in float32 and
    hoists the weight conversions out of the loop; measured on 2B here:
    1.1 tokens/s and 21 GB peak with XLA, 1.6 tokens/s and 7.5 GB without.
    """
    import tensorflow as tf

    return not (_low_precision(compute_dtype) and not tf.config.list_logical_devices("GPU"))


def accumulates_in_float32(compute_dtype):
    """Whether low-precision products should ask for a float32 result.

    JAX's XLA on CPU runs a bfloat16 product that returns bfloat16 at ~25
    GFLOP/s, against ~135 asked for float32 (`[32, 2048] @ [2048, 16384]`,
    measured here): the 2B prefill's products took ~4.5 s of an 8-token
    call. Accelerators have native low-precision matrix units; TensorFlow
    runs them through oneDNN, and PyTorch decodes in `torch_decoding`.
    """
    if keras.config.backend() != "jax":
        return False
    import jax

    return _low_precision(compute_dtype) and jax.default_backend() == "cpu"


def one_row_product_in_float32(row, kernel):
    """`row @ kernel.T` in float32, for a `[1, in]` row and a low-precision
    `[out, in]` kernel, on JAX's CPU backend (see `accumulates_in_float32`).

    XLA's one-row product there goes to a matrix-vector kernel that needs a
    float32 copy of the kernel (3.9 GB/s), and inside a decode loop it keeps
    that copy for the whole loop (+2.6 GB on 2B). Two other forms read the
    weights as stored, in one fused loop, with no copy:
    - a multiply-reduce, parallel over output rows: for tall kernels
      (2B 16384x2048 and 256000x2048: 9-12 GB/s against 4-7);
    - two rows, the second zero (no extra weight traffic): for the rest
      (2048x16384: 11 against 3; 2048x2048: 6 against 4.5).
    Measured with throwaway jitted sums over several distinct kernels.
    """
    out_dim, in_dim = kernel.shape
    if out_dim >= 4 * in_dim:
        import jax

        # Tied to the row, the kernel's conversion cannot be hoisted out of
        # a decode loop as a float32 copy (+7 GB on 2B).
        kernel, row = jax.lax.optimization_barrier((kernel, row))
        products = keras.ops.cast(kernel, "float32") * keras.ops.cast(row, "float32")
        return keras.ops.sum(products, axis=-1)[None]
    rows = keras.ops.concatenate([row, keras.ops.zeros_like(row)], axis=0)
    return einsum_in_float32("ri,oi->ro", rows, kernel)[:1]


def decode_embedding_lookup(embedding, token_ids):
    """`embedding(token_ids)` for a Keras `Embedding`, inside a decode loop.

    JAX on CPU, low precision: XLA turns the step's bfloat16 row lookup into
    a lookup in a float32 copy of the whole table, which it makes once
    before the loop and keeps for all of it (2B: +2 GB). Tying the table to
    the step's token ids with an optimization barrier keeps the conversion
    inside the lookup, where it touches only the rows looked up.
    """
    if embedding.quantization_mode is not None or not accumulates_in_float32(
        embedding.compute_dtype
    ):
        return embedding(token_ids)
    import jax

    table, token_ids = jax.lax.optimization_barrier((embedding.embeddings.value, token_ids))
    return keras.ops.cast(keras.ops.take(table, token_ids, axis=0), embedding.compute_dtype)


def einsum_in_float32(equation, x, kernel):
    """`einsum` of two low-precision tensors, accumulated and returned in
    float32 (see `accumulates_in_float32`); JAX only."""
    import jax.numpy as jnp

    return jnp.einsum(equation, x, kernel, preferred_element_type=jnp.float32)


def projection_einsum(compute_dtype, rows):
    """An einsum faster than `EinsumDense`'s own call for projecting `rows`
    rows in `compute_dtype`, or None where the layer's call is the fast one.

    JAX on CPU: `einsum_in_float32` (see `accumulates_in_float32`).
    TensorFlow on a CPU without bfloat16 instructions (AVX2 only), one row:
    `tf.einsum` itself. Keras rewrites a projection's einsum into
    `tf.matmul`, whose bfloat16 kernel there reads weights at ~0.5 GB/s
    against ~6 GB/s for the einsum kernel (one row times a 2048x16384
    kernel, `benchmarks/cpu_kernels.py`); the 2B feed-forward took 280 ms
    per layer and token. From 2 rows on the einsum kernel is the slower one
    (32 rows: 0.1 GB/s against 0.4).
    """
    if accumulates_in_float32(compute_dtype):
        return einsum_in_float32
    if rows == 1 and _tensorflow_matmul_lacks_bfloat16(compute_dtype):
        import tensorflow as tf

        return tf.einsum
    return None


def kernel_first_product(compute_dtype, rows):
    """`(rows, kernel) -> rows @ kernel.T` for `rows` (> 1) rows times an
    `[out, in]` kernel, computed as `(kernel @ rows.T).T`, or None where
    Keras's product is the fast one.

    TensorFlow on a CPU without bfloat16 instructions: its bfloat16 matmul
    runs ~1.3x faster with the kernel on the left for 32 rows, ~2.2x for
    512 (16384x2048: 156 against 205 ms, 458 against 1017;
    `benchmarks/cpu_kernels.py`); the 2B prefill is mostly such products
    (32-token prompt, 8 new tokens: 0.46 -> 0.61 tokens/s).
    """
    if rows is None or rows < 2 or not _tensorflow_matmul_lacks_bfloat16(compute_dtype):
        return None
    import tensorflow as tf

    return lambda x, kernel: tf.transpose(tf.matmul(kernel, x, transpose_b=True))


def after(x, dependency):
    """`x`, read only once `dependency` is computed.

    TensorFlow's graphs run independent ops side by side, each with its own
    transient buffers: the feed-forward's gate and up products in a 2B
    32-token prefill peaked at 1.26x the weights' bytes, and 1.23x in turn
    (though ~15% slower end to end, 0.53 against 0.63 tokens/s: the two
    bfloat16 products shared the 2 cores better; `gemma_2b_speed.py
    --backend tensorflow` with and without this dependency). Elsewhere ops
    already run in program order.
    """
    if keras.config.backend() != "tensorflow":
        return x
    import tensorflow as tf

    with tf.control_dependencies([dependency]):
        return tf.identity(x)


def _tensorflow_matmul_lacks_bfloat16(compute_dtype):
    if keras.config.backend() != "tensorflow":
        return False
    if keras.backend.standardize_dtype(compute_dtype) != "bfloat16":
        return False
    import tensorflow as tf

    # An unknown CPU keeps Keras's own products.
    return not tf.config.list_logical_devices("GPU") and _cpu_bfloat16_instructions() == []


@functools.cache
def _cpu_bfloat16_instructions():
    """This CPU's bfloat16 instruction sets (`avx512_bf16`, `amx_bf16`), or
    None where `/proc/cpuinfo` cannot tell."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return None


def _low_precision(dtype):
    return keras.backend.standardize_dtype(dtype) in ("bfloat16", "float16")
