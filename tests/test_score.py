import numpy as np
import pytest
from conftest import make_backbone
from helpers import to_numpy

from keras_gemma import GemmaCausalLM

TOKENS = np.array([[2, 11, 12, 13, 14], [2, 21, 22, 0, 0]], "int32")
MASK = (TOKENS > 0).astype("int32")


@pytest.fixture(scope="module")
def lm():
    return GemmaCausalLM(make_backbone("gqa", seed=4))


def _log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_log_probs_of_next_tokens(lm):
    logits = to_numpy(lm.score(TOKENS, MASK))
    log_probs = to_numpy(lm.score(TOKENS, MASK, scoring_mode="log_probs"))
    reference = _log_softmax(logits.astype("float64"))
    for b, length in enumerate(MASK.sum(1)):
        for t in range(5):
            expected = reference[b, t, TOKENS[b, t + 1]] if t + 1 < length else 0.0
            assert log_probs[b, t] == pytest.approx(expected, abs=1e-5)


def test_loss_mode_is_negative_log_prob_of_targets(lm):
    targets = np.array([[5, 6, 7, 8, 9], [3, 4, 5, 6, 7]], "int32")
    loss = to_numpy(lm.score(TOKENS, MASK, scoring_mode="loss", target_ids=targets))
    reference = _log_softmax(to_numpy(lm.score(TOKENS, MASK)).astype("float64"))
    expected = -np.take_along_axis(reference, targets[..., None], -1)[..., 0] * MASK
    np.testing.assert_allclose(loss, expected, atol=1e-5)


def test_score_errors(lm):
    with pytest.raises(ValueError, match="scoring_mode"):
        lm.score(TOKENS, scoring_mode="probabilities")
    with pytest.raises(ValueError, match="needs `target_ids`"):
        lm.score(TOKENS, scoring_mode="loss")
    with pytest.raises(ValueError, match="must be in \\[0, 384\\)"):
        lm.score(np.array([[2, 999]]))
