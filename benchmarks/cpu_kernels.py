"""The CPU kernel facts behind the package's product forms, measured here.

    python benchmarks/cpu_kernels.py                  # torch, tensorflow, jax
    python benchmarks/cpu_kernels.py --backend torch

Each figure is a product over weights read from memory, not cache: the
matrices together (0.8-1.6 GB) are larger than this machine's L3 (300 MB),
so a single matrix timed in a loop would flatter every kernel. GB/s counts
weight bytes. The figures decide the product forms of
`keras_gemma/backends/` (torch_cpu.py, xla_cpu.py) and the step logits of
`keras_gemma/causal_lm.py`; `benchmarks/RESULTS.md` keeps past runs.
"""

import argparse
import os
import time

import numpy as np
from _machine import describe_cpu

OUT_DIM, IN_DIM = 16384, 2048  # one 2B feed-forward kernel
WEIGHT_COUNT = OUT_DIM * IN_DIM


def _seconds_per_matrix(product, matrices, block=lambda result: result, repeats=3):
    """Mean seconds of `product(matrix)` over `matrices`, after one warm-up pass."""
    block([product(m) for m in matrices])
    start = time.perf_counter()
    for _ in range(repeats):
        block([product(m) for m in matrices])
    return (time.perf_counter() - start) / repeats / len(matrices)


def _report(label, seconds_per_matrix, bytes_per_weight, weights=WEIGHT_COUNT):
    gb_per_s = weights * bytes_per_weight / seconds_per_matrix / 1e9
    print(f"  {label:<58}{seconds_per_matrix * 1e3:8.2f} ms{gb_per_s:8.1f} GB/s")


def torch_kernels():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import torch

    from keras_gemma.backends import cpu_kernels
    from keras_gemma.backends.cpu_kernels import matvec
    from keras_gemma.backends.torch_cpu import _linear
    from keras_gemma.backends.torch_cpu import _linear_in_float32_pieces

    print("torch (2048 -> 16384 per matrix)")
    # Every row count, to see where it stops paying; set before the build,
    # which fixes the C file's limit.
    cpu_kernels.MAX_ROWS = 64
    native = cpu_kernels._library() is not None
    int8 = [
        (torch.randint(-127, 128, (OUT_DIM, IN_DIM), dtype=torch.int8), torch.rand(OUT_DIM))
        for _ in range(24)
    ]
    int8pack = torch.ops.aten._weight_int8pack_mm
    matrices = [(k, s.bfloat16()) for k, s in int8]
    for rows in (1, 4, 8, 16, 32, 64):  # `_INT8PACK_MAX_ROWS`, `cpu_kernels.MAX_ROWS`
        x = torch.randn(rows, IN_DIM, dtype=torch.bfloat16)
        seconds = _seconds_per_matrix(lambda m, x=x: int8pack(x, *m), matrices)
        _report(f"bf16 x{rows}, int8 weights: _weight_int8pack_mm", seconds, 1)
        if native:
            seconds = _seconds_per_matrix(lambda m, x=x: matvec(x, *m), matrices)
            _report(f"bf16 x{rows}, int8 weights: cpu_kernels (AVX2)", seconds, 1)
        if rows > 1:
            seconds = _seconds_per_matrix(lambda m, x=x: _linear_in_float32_pieces(x, *m), matrices)
            _report(f"bf16 x{rows}, int8 weights: float32 pieces", seconds, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x = torch.randn(1, IN_DIM, dtype=torch.bfloat16)
    seconds = _seconds_per_matrix(lambda m: int8pack(x, *m), matrices)
    _report("bf16 x1, int8 weights: _weight_int8pack_mm, one thread", seconds, 1)
    torch.set_num_threads(threads)
    x = torch.randn(1, IN_DIM)
    seconds = _seconds_per_matrix(lambda m: int8pack(x, *m), int8)
    _report("float32 x1, int8 weights: _weight_int8pack_mm", seconds, 1)
    seconds = _seconds_per_matrix(lambda m: _linear_in_float32_pieces(x, *m), int8)
    _report("float32 x1, int8 weights: float32 pieces", seconds, 1)
    if native:
        seconds = _seconds_per_matrix(lambda m: matvec(x, *m), int8)
        _report("float32 x1, int8 weights: cpu_kernels (AVX2)", seconds, 1)
    del int8, matrices
    bf16 = [torch.randn(OUT_DIM, IN_DIM, dtype=torch.bfloat16) for _ in range(24)]
    x = torch.randn(IN_DIM, dtype=torch.bfloat16)
    seconds = _seconds_per_matrix(lambda w: torch.mv(w, x), bf16)
    _report("bf16 x1, bf16 weights [out, in]: torch.mv", seconds, 2)
    if native:
        seconds = _seconds_per_matrix(lambda w: matvec(x[None], w), bf16)
        _report("bf16 x1, bf16 weights [out, in]: cpu_kernels (AVX2)", seconds, 2)
    for rows in (4, 8, 16, 32):  # `_FLOAT32_PIECES_MIN_ROWS`, `cpu_kernels.MAX_ROWS`
        x = torch.randn(rows, IN_DIM, dtype=torch.bfloat16)
        seconds = _seconds_per_matrix(lambda w, x=x: torch.nn.functional.linear(x, w), bf16[:6])
        _report(f"bf16 x{rows}, bf16 weights: F.linear", seconds, 2)
        seconds = _seconds_per_matrix(lambda w, x=x: _linear_in_float32_pieces(x, w), bf16[:6])
        _report(f"bf16 x{rows}, bf16 weights: float32 pieces", seconds, 2)
        if native:
            seconds = _seconds_per_matrix(lambda w, x=x: matvec(x, w), bf16[:6])
            _report(f"bf16 x{rows}, bf16 weights: cpu_kernels (AVX2)", seconds, 2)
    del bf16
    f32 = [torch.randn(OUT_DIM, IN_DIM) for _ in range(12)]
    x = torch.randn(1, IN_DIM)
    seconds = _seconds_per_matrix(lambda w: torch.mv(w, x[0]), f32)
    _report("float32 x1, float32 weights: torch.mv (MKL)", seconds, 4)
    seconds = _seconds_per_matrix(lambda w: _linear(x, w), f32)
    _report("float32 x1, float32 weights: _linear (oneDNN where built)", seconds, 4)


def tensorflow_kernels():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    print("tensorflow, tf.function without XLA (2048 -> 16384 per matrix)")
    rng = np.random.default_rng(0)
    weights = tf.constant(rng.standard_normal((12, IN_DIM, OUT_DIM), np.float32), tf.bfloat16)
    x = tf.constant(rng.standard_normal((1, IN_DIM), np.float32), tf.bfloat16)
    keras_layout = list(tf.unstack(weights))
    transposed = list(tf.unstack(tf.transpose(weights, (0, 2, 1))))  # same bytes, [out, in]
    del weights
    x3 = x[None]  # [batch, length, in], as a projection sees a decode step
    forms = [
        (
            "bf16 x1 @ W [in, out] (Keras's layout): tf.matmul",
            tf.function(lambda w: tf.matmul(x, w)),
            keras_layout,
        ),
        (
            "bf16 x1 @ W [in, out]: tf.einsum",
            tf.function(lambda w: tf.einsum("btd,df->btf", x3, w)),
            keras_layout,
        ),
        (
            "W [out, in] @ x1 (the transposed layout): tf.matmul",
            tf.function(lambda w: tf.matmul(w, x, transpose_b=True)),
            transposed,
        ),
    ]
    for rows in (32, 512):
        xs = tf.constant(rng.standard_normal((rows, IN_DIM), np.float32), tf.bfloat16)
        forms += [
            (
                f"bf16 x{rows} @ W.T, W [out, in]: tf.matmul(x, W, transpose_b)",
                tf.function(lambda w, xs=xs: tf.matmul(xs, w, transpose_b=True)),
                transposed[:6],
            ),
            (
                f"bf16 x{rows}, W [out, in]: (W @ x.T).T, kernel first",
                tf.function(lambda w, xs=xs: tf.transpose(tf.matmul(w, xs, transpose_b=True))),
                transposed[:6],
            ),
        ]
    for label, form, matrices in forms:
        _report(label, _seconds_per_matrix(form, matrices), 2)


def jax_kernels():
    import jax
    import jax.numpy as jnp

    print("jax, jit (2048 -> 16384 per matrix; the tied table is 256000 x 2048)")
    rng = np.random.default_rng(0)
    weights = [
        jnp.asarray(rng.standard_normal((IN_DIM, OUT_DIM), np.float32), jnp.bfloat16)
        for _ in range(12)
    ]
    x = jnp.asarray(rng.standard_normal((32, IN_DIM)), jnp.bfloat16)
    for label, result in (("bf16 result", None), ("float32 result", jnp.float32)):
        product = jax.jit(
            lambda w, r=result: jnp.einsum("bd,df->bf", x, w, preferred_element_type=r)
        )
        seconds = _seconds_per_matrix(product, weights, jax.block_until_ready)
        _report(f"bf16 x32 @ W [in, out], {label}", seconds, 2)
    del weights
    # A decode step's row times tall `[out, in]` kernels, in one jit as in a step.
    tall = [
        jnp.asarray(rng.standard_normal((OUT_DIM, IN_DIM), np.float32), jnp.bfloat16)
        for _ in range(6)
    ]
    row = jnp.asarray(rng.standard_normal((1, IN_DIM)), jnp.bfloat16)
    two_rows = jnp.concatenate([row, jnp.zeros_like(row)])
    for label, product in (
        (
            "two rows",
            lambda w: jnp.einsum("ri,oi->ro", two_rows, w, preferred_element_type=jnp.float32),
        ),
        (
            "multiply-reduce",
            lambda w: jnp.sum(w.astype(jnp.float32) * row.astype(jnp.float32), axis=-1)[None],
        ),
    ):
        step = jax.jit(lambda ws, p=product: sum(p(w)[:1] for w in ws))
        seconds = _seconds_per_matrix(step, [tall], jax.block_until_ready) / len(tall)
        _report(f"bf16 x1 @ W [out, in], {label}", seconds, 2)
    del tall
    table = jnp.asarray(rng.standard_normal((256000, IN_DIM), np.float32), jnp.bfloat16)
    for rows in (1, 2):
        hidden = jnp.asarray(rng.standard_normal((rows, IN_DIM)), jnp.bfloat16)
        logits = jax.jit(
            lambda t, h=hidden: jnp.einsum("vd,bd->bv", t, h, preferred_element_type=jnp.float32)
        )
        seconds = _seconds_per_matrix(logits, [table], jax.block_until_ready)
        _report(f"tied logits (whole table), bf16 x{rows}, float32 result", seconds, 2, table.size)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["torch", "tensorflow", "jax"])
    args = parser.parse_args()
    print(describe_cpu())
    kernels = {"torch": torch_kernels, "tensorflow": tensorflow_kernels, "jax": jax_kernels}
    for backend in [args.backend] if args.backend else list(kernels):
        kernels[backend]()


if __name__ == "__main__":
    main()
