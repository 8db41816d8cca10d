"""Completion log-probabilities, completion masks and the reference policy."""

import numpy as np
import pytest
from conftest import make_backbone
from helpers import assert_close
from helpers import to_numpy
from helpers import value_and_gradients
from keras import ops

from keras_gemma import GemmaCausalLM
from keras_gemma.alignment.policy import ReferencePolicy
from keras_gemma.alignment.policy import adapters_disabled
from keras_gemma.alignment.policy import completion_log_probs
from keras_gemma.alignment.policy import completion_mask
from keras_gemma.alignment.policy import frozen_copy
from keras_gemma.alignment.policy import penalize_truncated
from keras_gemma.alignment.policy import score_completions

END = 1


def _lm(**overrides):
    return GemmaCausalLM(make_backbone("mqa", vocabulary_size=40, **overrides))


def _randomize_adapters(lm, seed=1):
    """Non-zero adapters, so that switching them off changes the model."""
    rng = np.random.default_rng(seed)
    for variable in lm.backbone.trainable_weights:
        variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))


def _rows():
    """Three prompt + completion rows of different lengths, right-padded."""
    rows = [([2, 5, 9], [7, 8, END]), ([2, 11], [4, 4, 4, 6]), ([2, 3, 3, 3, 12], [9])]
    width = max(len(p) + len(c) for p, c in rows) + 2
    ids = np.zeros((len(rows), width), "int32")
    padding = np.zeros_like(ids)
    completion = np.zeros_like(ids)
    for i, (prompt, reply) in enumerate(rows):
        n = len(prompt) + len(reply)
        ids[i, :n] = prompt + reply
        padding[i, :n] = 1
        completion[i, len(prompt) : n] = 1
    return ids, padding, completion


def test_completion_mask_keeps_first_end_token_and_flags_truncation():
    ids = np.array([[2, 5, 1, 6, 1, 1], [2, 5, 6, 7, 8, 9], [2, 1, 5, 6, 1, 0]])
    mask, truncated = completion_mask(ids, np.array([2, 2, 3]), [1])
    assert mask.tolist() == [[0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0]]
    assert truncated.tolist() == [False, True, False]
    # A cap on new tokens: an end token past it does not count.
    mask, truncated = completion_mask(ids, np.array([2, 2, 3]), [1], max_new_tokens=1)
    assert mask.sum(axis=1).tolist() == [1, 1, 1]
    assert truncated.tolist() == [False, True, True]
    assert penalize_truncated([1.0, 2.0, 3.0], truncated, 1.0).tolist() == [1.0, 1.0, 2.0]


def test_log_probs_of_mixed_length_prompts_equal_one_at_a_time():
    lm = _lm()
    ids, padding, completion = _rows()
    per_token, total = completion_log_probs(lm, ids, padding, completion)
    per_token, total = to_numpy(per_token), to_numpy(total)
    fast, entropy = score_completions(lm, ids, padding, completion)
    assert_close(fast, per_token, atol=1e-5)
    assert (entropy[completion[:, 1:] == 0] == 0).all() and (
        entropy[completion[:, 1:] == 1] > 0
    ).all()
    scored = to_numpy(lm.score(ids, padding, scoring_mode="log_probs"))[:, :-1]
    assert_close(per_token, scored * completion[:, 1:], atol=1e-5)
    for i in range(len(ids)):
        n = int(padding[i].sum())
        one = slice(i, i + 1)
        row, row_total = completion_log_probs(
            lm, ids[one, :n], padding[one, :n], completion[one, :n]
        )
        assert_close(row[0], per_token[i, : n - 1], atol=1e-5)
        assert_close(row_total[0], total[i], atol=1e-5)
        assert total[i] < 0


def test_completion_log_probs_are_differentiable():
    lm = _lm()
    ids, padding, completion = _rows()
    variables = lm.backbone.trainable_variables

    def loss():
        return -ops.sum(completion_log_probs(lm, ids, padding, completion)[1])

    value, grads = value_and_gradients(loss, variables)
    assert value > 0 and all(np.isfinite(g).all() for g in grads)
    assert sum(float(np.abs(g).sum()) for g in grads) > 0


def test_chunked_log_probs_equal_the_full_logits_and_their_gradients(monkeypatch):
    """With the logits budget cut, positions are scored 16 at a time (three
    chunks of 40 tokens); values, entropies and gradients equal the plain
    computation from the whole `[batch, length, vocabulary]` logits."""
    lm = _lm()
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 40, (2, 40)).astype("int32")
    padding = np.ones_like(ids)
    padding[1, 30:] = 0
    completion = np.zeros_like(ids)
    completion[0, 5:] = 1
    completion[1, 20:30] = 1
    variables = lm.backbone.trainable_variables

    def plain():
        hidden = lm.backbone({"token_ids": ids, "padding_mask": padding})
        logits = ops.cast(lm.compute_logits(hidden[:, :-1]), "float32")
        log_probs = ops.log_softmax(logits, axis=-1)
        per_token = ops.take_along_axis(log_probs, ids[:, 1:, None], axis=-1)[..., 0]
        entropy = -ops.sum(ops.exp(log_probs) * log_probs, axis=-1)
        mask = ops.convert_to_tensor(completion[:, 1:].astype("float32"))
        return per_token * mask, entropy * mask

    weights = ops.convert_to_tensor(np.linspace(1, 2, 39, dtype="float32"))
    expected_value, expected_grads = value_and_gradients(
        lambda: ops.sum(plain()[0] * weights), variables
    )
    expected_log_probs, expected_entropy = (to_numpy(ops.stop_gradient(x)) for x in plain())
    monkeypatch.setattr("keras_gemma.losses.LOGITS_BUDGET", 1)
    value, grads = value_and_gradients(
        lambda: ops.sum(completion_log_probs(lm, ids, padding, completion)[0] * weights),
        variables,
    )
    assert_close(value, expected_value, atol=1e-4)
    for g, e in zip(grads, expected_grads):
        assert_close(g, e, atol=1e-5)
    log_probs, entropy = score_completions(lm, ids, padding, completion)
    assert_close(log_probs, expected_log_probs, atol=1e-5)
    assert_close(entropy, expected_entropy, atol=1e-5)


def test_adapters_off_reference_equals_a_frozen_copy():
    lm = _lm()
    copy = frozen_copy(lm)  # before LoRA: the base model
    lm.backbone.enable_lora(2, target_layer_names=["query", "value", "ffw_linear"])
    _randomize_adapters(lm)
    ids, padding, completion = _rows()
    with pytest.warns(UserWarning, match="merge_lora"):
        reference = ReferencePolicy(lm)
    assert reference.uses_adapters and reference.model is lm
    # Policy first: a compiled function traced with adapters on must not
    # serve the reference pass.
    policy = score_completions(lm, ids, padding, completion)[0]
    expected = score_completions(copy, ids, padding, completion)[0]
    assert np.abs(policy - expected).max() > 1e-3  # the adapters matter
    assert_close(reference.log_probs(ids, padding, completion), expected, atol=1e-5)
    with adapters_disabled(lm):
        eager = completion_log_probs(lm, ids, padding, completion)[0]
    assert_close(eager, expected, atol=1e-5)
    # Adapters back on afterwards, in eager and compiled passes.
    assert_close(score_completions(lm, ids, padding, completion)[0], policy, atol=1e-6)
    assert_close(completion_log_probs(lm, ids, padding, completion)[0], policy, atol=1e-5)


def test_fresh_adapters_give_a_reference_equal_to_the_policy():
    lm = _lm()
    lm.backbone.enable_lora(2)
    ids, padding, completion = _rows()
    reference = ReferencePolicy(lm)
    policy = score_completions(lm, ids, padding, completion)[0]
    assert_close(reference.log_probs(ids, padding, completion), policy, atol=1e-6)


def test_without_lora_the_reference_is_a_frozen_copy():
    lm = _lm()
    reference = ReferencePolicy(lm)
    assert not reference.uses_adapters and reference.model is not lm
    assert not reference.model.backbone.trainable_weights
    ids, padding, completion = _rows()
    before = score_completions(lm, ids, padding, completion)[0]
    assert_close(reference.log_probs(ids, padding, completion), before, atol=1e-6)
    for variable in lm.backbone.weights:
        variable.assign(to_numpy(variable) * 1.1)
    assert np.abs(score_completions(lm, ids, padding, completion)[0] - before).max() > 1e-4
    assert_close(reference.log_probs(ids, padding, completion), before, atol=1e-6)
