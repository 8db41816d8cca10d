"""Training losses computed from hidden states, in `keras.ops`."""

import math

import keras
from keras import ops

# Float32 logits held at once by the chunked loss: 128 MiB.
LOGITS_BUDGET = 2**25


def take_labels(values, labels):
    """`values[..., label]` at each position: `[..., n]` and `[...]` to `[...]`.

    A label outside `[0, n)` gives NaN, never another position's value. On
    TensorFlow it is one gather on the flattened values: Keras's
    `take_along_axis` there is a general `gather_nd`, slower forward and
    backward; on JAX and PyTorch `take_along_axis` is the faster one
    (`benchmarks/loss_speed.py`).

    Example:
    >>> import numpy as np
    >>> values = np.array([[1.0, 2.0], [3.0, 4.0]], "float32")
    >>> ops.convert_to_numpy(take_labels(values, np.array([1, 0]))).tolist()
    [2.0, 3.0]
    """
    shape = tuple(values.shape)
    labels = ops.cast(labels, "int32")
    width = shape[-1]
    valid = (labels >= 0) & (labels < width)
    labels = ops.clip(labels, 0, width - 1)
    # The flat index must fit int32, and the shape be known while tracing.
    flat = None not in shape and math.prod(shape) < 2**31
    if keras.config.backend() == "tensorflow" and flat:
        rows = ops.reshape(ops.arange(math.prod(shape[:-1]), dtype="int32"), shape[:-1])
        picked = ops.take(ops.reshape(values, (-1,)), rows * width + labels)
    else:
        picked = ops.take_along_axis(values, labels[..., None], axis=-1)[..., 0]
    return ops.where(valid, picked, float("nan"))


def chunked_cross_entropy(
    compute_logits, hidden, labels, sample_weight=None, chunk_size=None, vocabulary_size=None
):
    """`(Σ w·cross-entropy, Σ w·[argmax == label])` over all positions.

    The logits (`compute_logits(hidden)`, float32 `[batch, positions, vocab]`)
    are made `chunk_size` positions at a time and each chunk is recomputed in
    the backward pass (`keras.remat`), so a 256k vocabulary never holds the
    whole `[batch, sequence, vocabulary]` logits or their gradient. Default
    `chunk_size`: what fits `LOGITS_BUDGET` floats (at least 16 positions),
    from `vocabulary_size` (found by projecting one position if not given).

    Example:
    >>> import numpy as np
    >>> table = np.eye(3, dtype="float32")
    >>> loss, correct = chunked_cross_entropy(lambda h: h @ table.T,
    ...     np.eye(3, dtype="float32")[None] * 9, np.array([[0, 1, 1]]), chunk_size=2)
    >>> round(float(loss), 2), float(correct)
    (9.0, 2.0)
    """
    labels = ops.cast(labels, "int32")
    weights = ops.ones(ops.shape(labels)) if sample_weight is None else sample_weight
    weights = ops.cast(weights, "float32")

    def sums(hidden, labels, weights):
        logits = compute_logits(hidden)
        target = take_labels(logits, labels)
        losses = ops.logsumexp(logits, axis=-1) - target
        correct = ops.cast(ops.argmax(logits, axis=-1) == labels, "float32")
        # One output tensor: every backend's remat takes that form.
        return ops.stack([ops.sum(losses * weights), ops.sum(correct * weights)])

    batch, length = hidden.shape[0], hidden.shape[1]
    if chunk_size is None and length is not None:
        if vocabulary_size is None:
            vocabulary_size = compute_logits(hidden[:1, :1]).shape[-1]
        chunk_size = max(16, LOGITS_BUDGET // ((batch or 1) * vocabulary_size))
    if length is None or chunk_size >= length:
        totals = sums(hidden, labels, weights)
    else:
        chunk = keras.remat(sums)
        totals = 0.0
        for start in range(0, length, chunk_size):
            end = start + chunk_size
            totals = totals + chunk(
                hidden[:, start:end], labels[:, start:end], weights[:, start:end]
            )
    return totals[0], totals[1]
