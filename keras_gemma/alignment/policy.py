"""The policy side of alignment: completion log-probabilities, completion
masks and the reference policy the KL penalty is measured against.

A batch of completions is what generation returns: right-padded rows of
`prompt tokens, completion tokens, padding`, with a `completion_mask` that
is 1 on the completion tokens (up to and including the first end token).
Per-token quantities are `[batch, length - 1]`: entry `t` belongs to token
`t + 1`, predicted from the tokens before it, so
`completion_mask[:, 1:]` selects the completion's entries.
"""

import contextlib
import warnings
import weakref

import keras
import numpy as np
from keras import ops

from keras_gemma import backends
from keras_gemma import losses
from keras_gemma.backbone import quantizable_layers
from keras_gemma.causal_lm import token_log_probabilities
from keras_gemma.lora import lora_state


def _per_position(lm, token_ids, padding_mask, training, function):
    """`function(logits, targets)` for every position but the last, from
    float32 logits made a chunk of positions at a time (each chunk recomputed
    in the backward pass), so a 256k vocabulary never holds the whole
    `[batch, length, vocabulary]` logits, as in the training loss."""
    # The backbone and the tied head directly, not `lm(...)`: inside `fit`
    # a `GemmaCausalLM` may be set to return hidden states.
    hidden = lm.backbone({"token_ids": token_ids, "padding_mask": padding_mask}, training=training)
    hidden, targets = hidden[:, :-1], ops.cast(token_ids[:, 1:], "int32")

    def chunk(hidden, targets):
        return function(ops.cast(lm.compute_logits(hidden), "float32"), targets)

    batch, length = hidden.shape[0] or 1, hidden.shape[1]
    size = max(16, losses.LOGITS_BUDGET // (batch * lm.backbone.vocabulary_size))
    if length is None or size >= length:
        return chunk(hidden, targets)
    chunk = keras.remat(chunk)
    pieces = [
        chunk(hidden[:, i : i + size], targets[:, i : i + size]) for i in range(0, length, size)
    ]
    return ops.concatenate(pieces, axis=1)


def completion_log_probs(lm, token_ids, padding_mask, completion_mask, training=False):
    """Per-token log-probabilities of completions and their per-row sums.

    Differentiable, in `keras.ops` (use it inside a loss). Dropout is off
    unless `training=True`.

    Args:
        lm: a `GemmaCausalLM` (the policy).
        token_ids: `[batch, length]` right-padded prompt + completion ids.
        padding_mask: `[batch, length]`, 1 on real tokens.
        completion_mask: `[batch, length]`, 1 on completion tokens (see
            `completion_mask`).
        training: run the backbone in training mode (dropout).

    Returns:
        `(per_token, total)`: `[batch, length - 1]` log-probability of each
        next token, 0 outside the completion, and `[batch]` its sum, `log
        π(completion | prompt)`.

    Example:
    >>> import numpy as np
    >>> from keras_gemma import GemmaBackbone, GemmaCausalLM
    >>> lm = GemmaCausalLM(GemmaBackbone(vocabulary_size=32, num_layers=1,
    ...     num_query_heads=2, num_key_value_heads=1, hidden_dim=8,
    ...     intermediate_dim=16, head_dim=4))
    >>> ids = np.array([[2, 5, 7, 9]])
    >>> per_token, total = completion_log_probs(lm, ids, np.ones_like(ids),
    ...     np.array([[0, 0, 1, 1]]))
    >>> tuple(per_token.shape), tuple(total.shape)
    ((1, 3), (1,))
    """
    per_token = _per_position(lm, token_ids, padding_mask, training, token_log_probabilities)
    mask = ops.cast(completion_mask[:, 1:], "float32")
    per_token = per_token * mask
    return per_token, ops.sum(per_token, axis=-1)


def _log_probs_and_entropy(lm, token_ids, padding_mask, completion_mask):
    """`completion_log_probs` plus each completion position's entropy, no dropout."""

    def log_probs_and_entropy(logits, targets):
        log_probabilities = ops.log_softmax(logits, axis=-1)
        per_token = losses.take_labels(log_probabilities, targets)
        entropy = -ops.sum(ops.exp(log_probabilities) * log_probabilities, axis=-1)
        return ops.stack([per_token, entropy], axis=-1)  # one tensor, as remat wants

    both = _per_position(lm, token_ids, padding_mask, False, log_probs_and_entropy)
    mask = ops.cast(completion_mask[:, 1:], "float32")
    return both[..., 0] * mask, both[..., 1] * mask


# Compiled no-gradient scorers, per model. A LoRA layer reads `lora_enabled`
# when a JAX or TensorFlow function is traced, so the flags are part of the
# key: a function traced with adapters on never serves the reference pass.
_SCORERS = weakref.WeakKeyDictionary()


def _lora_flags(lm):
    return tuple(
        bool(getattr(layer, "lora_enabled", False)) for layer in quantizable_layers(lm.backbone)
    )


def score_completions(lm, token_ids, padding_mask, completion_mask):
    """Per-token log-probabilities and entropies of completions, without gradient.

    The fast path for rollouts and reference passes: compiled once per model
    and LoRA state (JAX, TensorFlow; PyTorch runs eagerly without autograd),
    dropout off.

    Returns:
        `(log_probs, entropy)`, NumPy float32 `[batch, length - 1]`, both 0
        outside the completion.

    Example:
    >>> import numpy as np
    >>> from keras_gemma import GemmaBackbone, GemmaCausalLM
    >>> lm = GemmaCausalLM(GemmaBackbone(vocabulary_size=32, num_layers=1,
    ...     num_query_heads=2, num_key_value_heads=1, hidden_dim=8,
    ...     intermediate_dim=16, head_dim=4))
    >>> ids = np.array([[2, 5, 7, 9]])
    >>> log_probs, entropy = score_completions(lm, ids, np.ones_like(ids),
    ...     np.array([[0, 0, 1, 1]]))
    >>> bool(log_probs[0, 0] == 0.0 and log_probs[0, 1] < 0.0 < entropy[0, 2])
    True
    """
    cache = _SCORERS.setdefault(lm, {})
    key = (tuple(map(id, lm.variables)), _lora_flags(lm))
    if key not in cache:
        if any(k[0] != key[0] for k in cache):
            cache.clear()  # new variables (merge_lora, quantize): drop the old weights

        def score(token_ids, padding_mask, completion_mask):
            return _log_probs_and_entropy(lm, token_ids, padding_mask, completion_mask)

        cache[key] = backends.compile_stateless(score, lm)
    arrays = [
        np.asarray(ops.convert_to_numpy(x)).astype("int32")
        for x in (token_ids, padding_mask, completion_mask)
    ]
    log_probs, entropy = cache[key](*map(ops.convert_to_tensor, arrays))
    return (
        np.asarray(ops.convert_to_numpy(log_probs), "float32"),
        np.asarray(ops.convert_to_numpy(entropy), "float32"),
    )


def completion_mask(token_ids, prompt_lengths, end_token_ids, max_new_tokens=None):
    """Which tokens of generated rows belong to the completion.

    A completion starts after its prompt and ends at its first end token,
    which counts (the policy chose to stop there); later tokens are masked.
    A completion that never produced an end token within `max_new_tokens`
    (or the row) is *truncated*.

    Args:
        token_ids: `[batch, length]` prompt + generated ids.
        prompt_lengths: `[batch]` prompt lengths.
        end_token_ids: ids that end a completion (e.g. `<eos>`, `<end_of_turn>`).
        max_new_tokens: optional cap on completion length.

    Returns:
        `(mask, truncated)`: int32 `[batch, length]` and bool `[batch]`, NumPy.

    Example:
    >>> mask, truncated = completion_mask(
    ...     np.array([[2, 5, 6, 1, 8], [2, 7, 7, 7, 7]]), np.array([2, 2]), [1])
    >>> mask.tolist(), truncated.tolist()
    ([[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]], [False, True])
    """
    token_ids = np.asarray(ops.convert_to_numpy(token_ids))
    prompt_lengths = np.asarray(ops.convert_to_numpy(prompt_lengths)).astype("int64")
    positions = np.arange(token_ids.shape[1])[None, :]
    generated = positions >= prompt_lengths[:, None]
    if max_new_tokens is not None:
        generated &= positions < prompt_lengths[:, None] + max_new_tokens
    is_end = np.isin(token_ids, list(end_token_ids)) & generated
    after_end = (np.cumsum(is_end, axis=1) - is_end) > 0
    return (generated & ~after_end).astype("int32"), ~is_end.any(axis=1)


def penalize_truncated(rewards, truncated, penalty):
    """`rewards` minus `penalty` where the completion was truncated (no end
    token): TRL's `missing_eos_penalty`, against rewarding rambling.

    Example:
    >>> penalize_truncated(np.array([1.0, 1.0]), np.array([False, True]), 0.5).tolist()
    [1.0, 0.5]
    """
    rewards = np.asarray(rewards, "float32")
    return rewards - np.float32(penalty) * np.asarray(truncated, "float32")


def _lora_layers(backbone):
    return [
        layer for layer in quantizable_layers(backbone) if getattr(layer, "lora_enabled", False)
    ]


@contextlib.contextmanager
def adapters_disabled(lm):
    """Within the block, `lm` (a `GemmaCausalLM` or `GemmaBackbone`) runs
    without its LoRA adapters; they are switched back on afterwards, also
    after an error.

    Eager calls and `score_completions` see the change. A JAX or TensorFlow
    function traced before the block keeps the adapters it was traced with,
    so don't call `generate` (whose compiled loop is cached) inside it.

    Example:
    >>> from keras_gemma import GemmaBackbone
    >>> backbone = GemmaBackbone(vocabulary_size=32, num_layers=1,
    ...     num_query_heads=2, num_key_value_heads=1, hidden_dim=8,
    ...     intermediate_dim=16, head_dim=4)
    >>> backbone.enable_lora(2)
    >>> query = backbone.transformer_layers[0].attention.query_dense
    >>> with adapters_disabled(backbone):
    ...     print(query.lora_enabled)
    False
    >>> query.lora_enabled
    True
    """
    backbone = getattr(lm, "backbone", lm)
    layers = _lora_layers(backbone)
    for layer in layers:
        layer.lora_enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.lora_enabled = True


def frozen_copy(lm):
    """A frozen copy of a `GemmaCausalLM`'s backbone and head, without
    preprocessor: a second full set of the weights in memory."""
    backbone = type(lm.backbone).from_config(lm.backbone.get_config())
    backbone.set_weights(lm.backbone.get_weights())
    backbone.trainable = False
    return type(lm)(backbone)


class ReferencePolicy:
    """The policy the KL penalty pulls toward: the model as it was before RL.

    With LoRA enabled on `lm`, the reference is `lm` itself with its adapters
    switched off (`adapters_disabled`): no second copy of the base weights.
    The adapters must then be fresh (zero update), so that switching them off
    gives back the starting policy; to continue from an adapter trained
    earlier (e.g. by SFT), `merge_lora()` it first and enable a new one.

    Without LoRA the reference is a frozen copy (`frozen_copy`), which costs
    a second set of the model's weights in memory (2B in bfloat16: 5 GB
    more) and a copy at construction.

    Args:
        lm: the policy, a `GemmaCausalLM`, in the state to use as reference.
        as_is: use `lm` itself, adapters and all, with no copy: for a
            reference that is a separate model (e.g. the SFT model when
            measuring how far a trained policy moved).

    Example:
    >>> import numpy as np
    >>> from keras_gemma import GemmaBackbone, GemmaCausalLM
    >>> lm = GemmaCausalLM(GemmaBackbone(vocabulary_size=32, num_layers=1,
    ...     num_query_heads=2, num_key_value_heads=1, hidden_dim=8,
    ...     intermediate_dim=16, head_dim=4))
    >>> lm.backbone.enable_lora(2)
    >>> reference = ReferencePolicy(lm)
    >>> reference.uses_adapters
    True
    >>> ids = np.array([[2, 5, 7]])
    >>> reference.log_probs(ids, np.ones_like(ids), np.array([[0, 1, 1]])).shape
    (1, 2)
    """

    def __init__(self, lm, as_is=False):
        self.lm = lm
        self.uses_adapters = not as_is and lora_state(lm.backbone) is not None
        if as_is:
            self.model = lm
        elif self.uses_adapters:
            trained = [
                layer.name
                for layer in _lora_layers(lm.backbone)
                if np.any(ops.convert_to_numpy(layer.lora_kernel_b) != 0)
            ]
            if trained:
                warnings.warn(
                    "The LoRA adapters already change the model (e.g. trained by SFT), so "
                    "the reference with adapters off is the base model, not this policy. "
                    "To use this policy as the reference, call `backbone.merge_lora()` and "
                    "`enable_lora` again before RL.",
                    stacklevel=2,
                )
            self.model = lm
        else:
            self.model = frozen_copy(lm)

    @contextlib.contextmanager
    def active(self):
        """Within the block, `self.model` computes the reference policy."""
        if self.uses_adapters:
            with adapters_disabled(self.model):
                yield self.model
        else:
            yield self.model

    def log_probs(self, token_ids, padding_mask, completion_mask):
        """Reference per-token log-probabilities, NumPy `[batch, length - 1]`,
        0 outside the completion (no gradient, dropout off)."""
        with self.active() as model:
            return score_completions(model, token_ids, padding_mask, completion_mask)[0]
