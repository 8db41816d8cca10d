"""The cross-entropy's label gather, forward and backward, on every backend:
`losses.take_labels` (on TensorFlow one gather on the flattened logits, on
JAX and PyTorch `take_along_axis` plus its out-of-vocabulary check) beside a
bare `ops.take_along_axis`, inside the same loss (log-sum-exp minus the
label's logit, plus the accuracy's argmax) on `[4, 128, 32000]` float32
logits, the shape of `fit_speed.py`'s step.

    python benchmarks/loss_speed.py                  # all three backends
    python benchmarks/loss_speed.py --backend tensorflow --repeats 20
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

from _machine import describe_cpu

SHAPE = (4, 128, 32000)


def _gradient_function(backend, loss):
    """`logits -> d loss / d logits`, compiled the way each backend's trainer runs."""
    if backend == "jax":
        import jax

        return jax.jit(jax.grad(loss))
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function
        def gradient(logits):
            with tf.GradientTape() as tape:
                tape.watch(logits)
                value = loss(logits)
            return tape.gradient(value, logits)

        return gradient

    def gradient(logits):
        logits = logits.detach().requires_grad_()
        loss(logits).backward()
        return logits.grad

    return gradient


def _child(backend, repeats):
    import keras
    import numpy as np
    from keras import ops

    from keras_gemma.losses import take_labels

    rng = np.random.default_rng(0)
    logits = ops.convert_to_tensor(rng.standard_normal(SHAPE).astype("float32"))
    labels = ops.convert_to_tensor(rng.integers(0, SHAPE[-1], SHAPE[:-1]).astype("int32"))
    weights = ops.ones(SHAPE[:-1])

    def loss_with(pick):
        def loss(logits):
            losses = ops.logsumexp(logits, axis=-1) - pick(logits, labels)
            correct = ops.cast(ops.argmax(logits, axis=-1) == labels, "float32")
            return ops.sum(losses * weights) + 0.0 * ops.sum(correct * weights)

        return loss

    def along(values, labels):
        return ops.take_along_axis(values, labels[..., None], axis=-1)[..., 0]

    results, gradients = {}, {}
    for name, pick in (("take_along_axis", along), ("take_labels", take_labels)):
        gradient = _gradient_function(keras.config.backend(), loss_with(pick))
        gradients[name] = ops.convert_to_numpy(gradient(logits))  # compile
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            ops.convert_to_numpy(gradient(logits))
            times.append(time.perf_counter() - start)
        results[name] = statistics.median(times) * 1000
    difference = abs(gradients["take_labels"] - gradients["take_along_axis"]).max()
    return results, difference


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["jax", "torch", "tensorflow"], action="append")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        results, difference = _child(args.child, args.repeats)
        print(
            f"{args.child:<11} {results['take_along_axis']:>16.1f} {results['take_labels']:>12.1f}"
            f" {results['take_along_axis'] / results['take_labels']:>8.2f}x"
            f"  (largest gradient difference {difference:.1e})"
        )
        return
    print(describe_cpu())
    print(f"loss forward + backward on {SHAPE} float32 logits, median of {args.repeats}, ms")
    print(f"{'backend':<11} {'take_along_axis':>16} {'take_labels':>12} {'speed-up':>9}")
    for backend in args.backend or ["jax", "torch", "tensorflow"]:
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        command = [sys.executable, __file__, "--child", backend, "--repeats", str(args.repeats)]
        output = subprocess.run(command, env=env, capture_output=True, text=True)
        print(output.stdout.strip() or f"{backend:<11} failed:\n{output.stderr[-2000:]}")


if __name__ == "__main__":
    main()
