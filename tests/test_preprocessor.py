import keras
import numpy as np
import pytest
from helpers import assert_config_round_trip

from keras_gemma import GemmaCausalLMPreprocessor


def test_packs_and_shifts_by_one(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=8)
    ids = tokenizer.tokenize("The fox")
    x, y, sample_weight = preprocessor(["The fox"])
    full = [2] + ids + [1]
    n = len(full)
    expected = full + [0] * (9 - n)
    assert x["token_ids"][0].tolist() == expected[:8]
    assert y[0].tolist() == expected[1:]
    assert x["padding_mask"][0].tolist() == [int(i < n) for i in range(8)]
    assert sample_weight[0].tolist() == [float(i < n - 1) for i in range(8)]


def test_truncates_to_sequence_length(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=4)
    x, y, sample_weight = preprocessor("The quick brown fox jumps over the lazy dog.")
    assert x["token_ids"].shape == (1, 4) and y.shape == (1, 4)
    assert sample_weight.tolist() == [[1.0] * 4]


def test_prompt_response_puts_weight_only_on_response(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=24)
    prompt, response = "What is 3 plus 4?", "3 plus 4 is 7."
    x, y, sample_weight = preprocessor({"prompts": [prompt], "responses": [response]})
    prompt_ids = [2] + tokenizer.tokenize(prompt)
    response_ids = tokenizer.tokenize(response) + [1]
    labels = y[0].tolist()
    weighted = [label for label, w in zip(labels, sample_weight[0]) if w > 0]
    assert weighted == response_ids  # the response and its <eos>, nothing else
    assert x["token_ids"][0, : len(prompt_ids)].tolist() == prompt_ids


def test_generate_preprocess_and_postprocess(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    batch = preprocessor.generate_preprocess(["The fox", "A"])
    assert batch["token_ids"].shape == (2, 16)
    assert batch["token_ids"][:, 0].tolist() == [2, 2]
    assert 1 not in batch["token_ids"].tolist()[0]  # no <eos> on prompts
    assert preprocessor.generate_postprocess(batch) == ["The fox", "A"]


def test_accepts_numpy_arrays(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=8)
    from_list = preprocessor(["a b", "c"])
    from_array = preprocessor(np.array(["a b", "c"]))
    for left, right in zip(keras.tree.flatten(from_list), keras.tree.flatten(from_array)):
        np.testing.assert_array_equal(left, right)


def test_config_round_trip(tokenizer):
    clone = assert_config_round_trip(GemmaCausalLMPreprocessor(tokenizer, sequence_length=12))
    assert clone.sequence_length == 12


def test_bad_inputs(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=8)
    with pytest.raises(ValueError, match="empty"):
        preprocessor([])
    with pytest.raises(TypeError, match="only strings"):
        preprocessor(["ok", None])
    with pytest.raises(ValueError, match="'prompts' and 'responses'"):
        preprocessor({"prompts": ["a"]})
    with pytest.raises(ValueError, match="same length"):
        preprocessor({"prompts": ["a", "b"], "responses": ["c"]})
    with pytest.raises(ValueError, match="sequence_length"):
        GemmaCausalLMPreprocessor(tokenizer, sequence_length=0)
