"""The samplers draw from the distribution they claim to.

Each random sampler is run on many copies of one row in a single call (a fixed
seed, so the draw is the same every run) and its empirical frequencies are
compared with the exact distribution by a chi-square statistic. Each test also
shows the statistic has power: the distribution a plausible bug would produce
(no truncation, no renormalisation, no temperature) is rejected.
"""

import itertools

import keras
import numpy as np
import pytest
from conftest import make_backbone
from helpers import to_numpy
from scipy import stats

from keras_gemma import BeamSampler
from keras_gemma import GemmaCausalLM
from keras_gemma import RandomSampler
from keras_gemma import TopKSampler
from keras_gemma import TopPSampler

DRAWS = 20_000
# Distinct logits, shuffled so that the best tokens are not the first ids.
LOGITS = np.array([0.3, 2.0, -1.0, 1.2, 0.0, 1.6, -0.5, 0.8], "float32")


def _softmax(logits):
    logits = np.asarray(logits, "float64")
    e = np.exp(logits - logits.max())
    return e / e.sum()


def _draw(sampler, logits=LOGITS):
    batch = keras.ops.convert_to_tensor(np.tile(logits, (DRAWS, 1)))
    tokens = to_numpy(sampler.get_next_token(sampler.compute_probabilities(batch)))
    return np.bincount(tokens.astype("int64"), minlength=len(logits))


def _fits(counts, expected_probabilities):
    """Chi-square goodness of fit on the tokens `expected_probabilities` allows.

    A draw outside its support fails outright. A 1e-4 significance level: at a
    fixed seed the test is deterministic, and a true distribution passes it.
    """
    support = expected_probabilities > 0
    if counts[~support].any():
        return False
    if support.sum() == 1:
        return True
    expected = expected_probabilities[support] * counts.sum()
    statistic = ((counts[support] - expected) ** 2 / expected).sum()
    return statistic < stats.chi2.ppf(1 - 1e-4, df=support.sum() - 1)


def _truncated(probabilities, keep):
    kept = np.where(keep, probabilities, 0.0)
    return kept / kept.sum()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_random_sampler_draws_the_tempered_softmax(temperature):
    counts = _draw(RandomSampler(seed=1, temperature=temperature))
    assert _fits(counts, _softmax(LOGITS / temperature))
    if temperature != 1.0:
        # Temperature really reshapes the distribution: the untempered one is rejected.
        assert not _fits(counts, _softmax(LOGITS))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_draws_only_the_k_best_in_proportion(k):
    counts = _draw(TopKSampler(k=k, seed=2, temperature=1.5))
    tempered = _softmax(LOGITS / 1.5)
    best = np.argsort(-LOGITS)[:k]
    assert set(np.flatnonzero(counts)) == set(best)
    assert _fits(counts, _truncated(tempered, np.isin(np.arange(8), best)))
    if k > 1:
        # Tokens outside the k best were never drawn, and among the k the
        # temperature still shapes the odds.
        assert not _fits(counts, _truncated(_softmax(LOGITS), np.isin(np.arange(8), best)))


@pytest.mark.parametrize("p, k", [(0.5, None), (0.8, None), (0.8, 2), (1.0, None)])
def test_top_p_draws_only_the_nucleus_in_proportion(p, k):
    probabilities = _softmax(LOGITS)
    order = np.argsort(-probabilities)
    # The nucleus: the most likely tokens while the mass before each is below p.
    mass_before = np.cumsum(probabilities[order]) - probabilities[order]
    nucleus = order[mass_before < p]
    if k is not None:
        nucleus = nucleus[:k]
    counts = _draw(TopPSampler(p=p, k=k, seed=3))
    assert set(np.flatnonzero(counts)) == set(nucleus)
    assert _fits(counts, _truncated(probabilities, np.isin(np.arange(8), nucleus)))
    if len(nucleus) < 8:
        # Renormalised over the nucleus, not the untruncated distribution.
        assert not _fits(counts, probabilities)


def test_seeded_samplers_differ_by_seed_and_advance():
    a, b = TopKSampler(k=4, seed=0), TopKSampler(k=4, seed=0)
    probabilities = keras.ops.convert_to_tensor(np.tile(_softmax(LOGITS), (64, 1)))
    first = to_numpy(a.get_next_token(probabilities))
    assert first.tolist() == to_numpy(b.get_next_token(probabilities)).tolist()
    assert first.tolist() != to_numpy(a.get_next_token(probabilities)).tolist()
    other = TopKSampler(k=4, seed=1)
    assert first.tolist() != to_numpy(other.get_next_token(probabilities)).tolist()


@pytest.fixture(scope="module")
def small_vocabulary_lm():
    # 16 tokens and 16 beams: beam search over two steps is exhaustive.
    backbone = make_backbone("mha", seed=3, vocabulary_size=16)
    # The same weights on every backend (their initializers draw differently),
    # so the stop token chosen below exists on each.
    rng = np.random.default_rng(3)
    for variable in backbone.weights:
        scale = float(np.std(to_numpy(variable))) or 0.5
        variable.assign(rng.normal(0, scale, variable.shape).astype("float32"))
    return GemmaCausalLM(backbone)


def _continuation_scores(lm, prompt, steps):
    """Every `steps`-token continuation of `prompt` and its per-step log-probabilities."""
    candidates = np.array([prompt + list(c) for c in itertools.product(range(16), repeat=steps)])
    log_probs = to_numpy(lm.score(candidates, scoring_mode="log_probs"))
    n = len(prompt)
    return candidates, log_probs[:, n - 1 : n - 1 + steps]


def _brute_force_best(candidates, step_scores, prompt_length, stop):
    """The most likely continuation when a stop token ends a beam, which is
    then padded at no cost."""
    generated = candidates[:, prompt_length:]
    is_stop = generated == stop
    stopped_before = np.cumsum(is_stop, axis=1) - is_stop > 0
    valid = np.all(~stopped_before | (generated == 0), axis=1)
    total = np.where(stopped_before, 0.0, step_scores).sum(axis=1)
    total[~valid] = -np.inf
    return candidates[total.argmax()].tolist()


def test_beam_search_with_stop_tokens_on_a_ragged_batch(small_vocabulary_lm):
    """Each row of a ragged batch gets its own exhaustive best, and a beam
    that emits the stop token is frozen there at its score."""
    lm = small_vocabulary_lm
    lm.compile(sampler=BeamSampler(num_beams=16))
    prompts = [[2, 4, 12], [2, 7, 3, 11]]
    width = 5  # row 0 generates two tokens, row 1 one
    token_ids = np.zeros((2, width), "int32")
    for row, prompt in enumerate(prompts):
        token_ids[row, : len(prompt)] = prompt
    batch = {"token_ids": token_ids, "padding_mask": token_ids > 0}
    scored = [_continuation_scores(lm, p, width - len(p)) for p in prompts]

    # The stop token: a first token of row 0 other than its unstopped best's
    # that beats every two-token continuation once frozen at its score (the
    # least likely such). Only correct freezing makes it the answer.
    candidates, step_scores = scored[0]
    first = step_scores[::16, 0]  # log p(first token), one per token id
    best_two = step_scores.sum(axis=1).max()
    unstopped_first = _brute_force_best(candidates, step_scores, 3, None)[3]
    winners = [t for t in range(1, 16) if first[t] > best_two and t != unstopped_first]
    stop = min(winners, key=lambda t: first[t])

    for stop_ids in [None, [stop]]:
        out = lm.generate(batch, stop_token_ids=stop_ids)
        for row, prompt in enumerate(prompts):
            expected = _brute_force_best(*scored[row], len(prompt), stop_ids and stop_ids[0])
            assert out["token_ids"][row].tolist() == expected, (stop_ids, row)
    assert out["token_ids"][0].tolist() == prompts[0] + [stop, 0]
    assert out["padding_mask"][0].tolist() == [1, 1, 1, 1, 0]


def test_top_p_nucleus_is_the_smallest_set_whose_mass_reaches_p():
    # Binary fractions, so the cumulative sums are exact: at p = 0.5 the mass
    # before the second most likely token is exactly p, and it is left out.
    probabilities = np.array([0.25, 0.5, 0.1875, 0.0625], "float32")
    batch = keras.ops.convert_to_tensor(np.tile(probabilities, (2_000, 1)))
    for p, nucleus in [(0.5, {1}), (0.75, {0, 1}), (0.9375, {0, 1, 2}), (1.0, {0, 1, 2, 3})]:
        tokens = to_numpy(TopPSampler(p=p, seed=4).get_next_token(batch))
        assert set(tokens.tolist()) == nucleus, p
    # keras-hub's default nucleus, and `p` outside (0, 1] is refused.
    assert TopPSampler().p == 0.1
    for p in (0.0, 1.01):
        with pytest.raises(ValueError, match="`p` must be in"):
            TopPSampler(p=p)


def test_one_beam_is_greedy_search(small_vocabulary_lm):
    lm = small_vocabulary_lm
    batch = {
        "token_ids": np.array([[2, 4, 12, 0, 0, 0]]),
        "padding_mask": np.array([[1] * 3 + [0] * 3]),
    }
    lm.compile(sampler="greedy")
    greedy = lm.generate(batch, stop_token_ids=None)["token_ids"].tolist()
    lm.compile(sampler=BeamSampler(num_beams=1))
    assert lm.generate(batch, stop_token_ids=None)["token_ids"].tolist() == greedy
    for num_beams in (0, 1.0):
        with pytest.raises(ValueError, match="`num_beams` must be a positive integer"):
            BeamSampler(num_beams=num_beams)


def test_a_seeded_sampler_draws_with_its_settings_at_the_time():
    """Changing `k` after a draw takes effect (TensorFlow compiles the seeded
    draw once, holding `k` as a constant unless it is rebuilt)."""
    sampler = TopKSampler(k=8, seed=0)
    batch = keras.ops.convert_to_tensor(np.tile(LOGITS, (256, 1)))
    probabilities = sampler.compute_probabilities(batch)
    tokens, _ = sampler._draw(probabilities, sampler.initial_seed())
    assert len(np.unique(to_numpy(tokens))) > 2
    sampler.k = 1
    tokens, _ = sampler._draw(probabilities, sampler.initial_seed())
    np.testing.assert_array_equal(to_numpy(tokens), LOGITS.argmax())
