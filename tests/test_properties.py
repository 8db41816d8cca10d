"""Property-based tests (Hypothesis) of the laws the library promises.

Examples are few and derandomized (a fixed sequence, no example database), so
CI sees the same cases every run on every backend.
"""

import keras
import numpy as np
import pytest
from conftest import TOKENIZER_CORPUS
from conftest import TOKENIZER_VOCABULARY_SIZE
from conftest import make_backbone
from helpers import to_numpy
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_gemma import GemmaCausalLM
from keras_gemma import GemmaCausalLMPreprocessor
from keras_gemma import token_log_probabilities


def _settings(max_examples):
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None)


# Words the vocabulary has merges for, so texts mix learnt pieces, turn
# markers and byte-fallback characters.
_WORDS = sorted({w for line in TOKENIZER_CORPUS for w in line.split()}) + [
    "<start_of_turn>",
    "<end_of_turn>",
    " ",
    "\n",
    "  ",
]
_TEXT = st.lists(st.one_of(st.text(max_size=6), st.sampled_from(_WORDS)), max_size=8).map("".join)


@_settings(60)
@given(text=_TEXT)
def test_tokenizer_round_trips_any_unicode(tokenizer, text):
    ids = tokenizer.tokenize(text)
    assert tokenizer.detokenize(ids) == text
    # Byte fallback: no character is lost to <unk>.
    assert tokenizer.token_to_id("<unk>") not in ids
    # Batches tokenize row by row.
    assert tokenizer.tokenize([text, "a"]) == [ids, tokenizer.tokenize("a")]


@pytest.fixture(scope="module")
def lm(tokenizer):
    lm = GemmaCausalLM(make_backbone("gqa", seed=11), GemmaCausalLMPreprocessor(tokenizer, 16))
    lm.compile(sampler="greedy")  # once: compiling again drops the compiled loops
    return lm


_TOKEN = st.integers(3, TOKENIZER_VOCABULARY_SIZE - 1)
_WIDTH = 16  # one shape bucket: no recompilation between examples of a batch size


def _rows(prompts, width=_WIDTH):
    token_ids = np.zeros((len(prompts), width), "int32")
    padding_mask = np.zeros((len(prompts), width), "int32")
    for i, prompt in enumerate(prompts):
        token_ids[i, : len(prompt)] = prompt
        padding_mask[i, : len(prompt)] = 1
    return {"token_ids": token_ids, "padding_mask": padding_mask}


@_settings(15)
@given(prompts=st.lists(st.lists(_TOKEN, min_size=1, max_size=12), min_size=3, max_size=3))
def test_batched_greedy_generation_equals_each_prompt_alone(lm, prompts):
    batched = lm.generate(_rows(prompts), stop_token_ids=None)["token_ids"]
    for i, prompt in enumerate(prompts):
        alone = lm.generate(_rows([prompt]), stop_token_ids=None)["token_ids"]
        np.testing.assert_array_equal(batched[i], alone[0], err_msg=f"prompt {i}: {prompt}")
        assert batched[i, : len(prompt)].tolist() == prompt


def _weighted_sum(lm, inputs, labels, weights):
    log_probs = token_log_probabilities(lm(inputs), labels)
    return float(to_numpy(-keras.ops.sum(log_probs * keras.ops.convert_to_tensor(weights))))


_EXAMPLE = st.tuples(
    st.lists(_TOKEN, min_size=1, max_size=14),
    st.lists(st.sampled_from([0.0, 1.0]), min_size=14, max_size=14),
)


_ROWS = 5  # fixed shapes: no recompilation between examples


def _padded(inputs, labels, weights, rows=_ROWS):
    """Adds all-padding rows (zero weight) up to `rows`."""
    extra = rows - len(labels)

    def pad(x):
        return np.concatenate([x, np.zeros((extra,) + x.shape[1:], x.dtype)])

    return {k: pad(v) for k, v in inputs.items()}, pad(labels), pad(weights)


@_settings(12)
@given(raw=st.lists(_EXAMPLE, min_size=1, max_size=_ROWS))
def test_packed_loss_equals_each_example_alone(lm, tokenizer, raw):
    """The weighted loss of packed rows is the sum of each example's loss
    computed in its own row (attention and positions do not cross examples)."""
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=16, packing=True)
    examples = [([tokenizer.start_token_id] + ids, [0.0] + w[: len(ids)]) for ids, w in raw]
    inputs, labels, weights = preprocessor.pack(examples)
    # Every target token is placed exactly once (nothing is truncated here).
    assert weights.sum() == sum(sum(w[1:]) for _, w in examples)
    if len(examples) > 1 and max(len(ids) for ids, _ in examples) < 9:
        assert len(labels) < len(examples)  # short examples really share rows
    packed = _weighted_sum(lm, *_padded(inputs, labels, weights))
    # Unpacked: one example per row, right-padded.
    ids = np.zeros((len(examples), 17), "int32")
    mask, w = np.zeros_like(ids), np.zeros(ids.shape, "float32")
    for i, (row, row_weights) in enumerate(examples):
        ids[i, : len(row)], mask[i, : len(row)], w[i, : len(row)] = row, 1, row_weights
    unpacked = {"token_ids": ids[:, :-1], "padding_mask": mask[:, :-1]}
    alone = _weighted_sum(lm, *_padded(unpacked, ids[:, 1:], w[:, 1:]))
    np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-4)


@_settings(10)
@given(
    data=st.data(),
    length=st.integers(2, 12),
    layout=st.sampled_from(["mqa", "gqa", "mha"]),
)
def test_cached_decoding_equals_full_recomputation(data, length, layout):
    """Prefill a random prefix, then feed the rest one token at a time through
    the cache: every position's logits equal the full pass. (Widths are
    fixed at 16, right-padded, so eager backends do not recompile per case.)"""
    tokens = data.draw(st.lists(_TOKEN, min_size=length, max_size=length))
    prefill = data.draw(st.integers(1, length))
    backbone = _backbones[layout]
    lm = GemmaCausalLM(backbone)
    full = to_numpy(lm(_rows([tokens])))[0, :length]
    token_ids = np.array([tokens])
    cache = backbone.empty_cache(1, _WIDTH)
    hidden, cache = backbone.compute_hidden_states(token_ids[:, :prefill], cache=cache)
    steps = [to_numpy(lm.compute_logits(hidden))[0]]
    for i in range(prefill, length):
        hidden, cache = backbone.compute_hidden_states(
            token_ids[:, i : i + 1], cache=cache, cache_update_index=i
        )
        steps.append(to_numpy(lm.compute_logits(hidden))[0])
    np.testing.assert_allclose(np.concatenate(steps), full, atol=1e-4)


class _Backbones(dict):
    def __missing__(self, layout):
        self[layout] = make_backbone(layout, seed=12)
        return self[layout]


_backbones = _Backbones()
