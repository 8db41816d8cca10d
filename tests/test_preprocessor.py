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


def test_sequence_length_one_is_allowed(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=1)
    x, y, sample_weight = preprocessor(["The fox"])
    assert x["token_ids"].tolist() == [[2]] and y.tolist() == [[tokenizer.tokenize("The fox")[0]]]
    assert sample_weight.tolist() == [[1.0]]


def test_pack_by_hand(tokenizer):
    # First fit, longest first; an example of n tokens fills n - 1 positions.
    pad = tokenizer.pad_token_id
    examples = [
        ([2, 20, 1], [0.0, 1.0, 1.0]),  # fills 2: exactly what row 0 has left
        ([2, 10, 11, 12, 1], [0.0, 0.0, 1.0, 1.0, 1.0]),  # fills 4: row 0
        ([2], [1.0]),  # nothing to predict: dropped
        ([2, 30, 31, 1], [1.0, 1.0, 1.0, 1.0]),  # fills 3: no room in row 0
    ]
    inputs, labels, weights = GemmaCausalLMPreprocessor(tokenizer, sequence_length=6).pack(examples)
    assert inputs["token_ids"].tolist() == [[2, 10, 11, 12, 2, 20], [2, 30, 31, pad, pad, pad]]
    assert labels.tolist() == [[10, 11, 12, 1, 20, 1], [30, 31, 1, pad, pad, pad]]
    assert weights.tolist() == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert inputs["segment_ids"].tolist() == [[1, 1, 1, 1, 2, 2], [1, 1, 1, 0, 0, 0]]
    assert inputs["padding_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    # Longer than a row: truncated to it, one example per row.
    inputs, labels, weights = GemmaCausalLMPreprocessor(tokenizer, sequence_length=3).pack(
        [([2, 5, 6, 7, 8, 1], [0.0, 1.0, 1.0, 1.0, 1.0, 1.0])]
    )
    assert inputs["token_ids"].tolist() == [[2, 5, 6]] and labels.tolist() == [[5, 6, 7]]


def test_conversation_weights_only_the_model_turns(tokenizer):
    # Gemma's template, written out: the model's text and <end_of_turn> carry
    # the loss; the system message is folded into the first user turn; no
    # newline follows the last reply.
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=64)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "Bye"},
        {"role": "model", "content": "Ciao"},
    ]
    [(ids, weights)] = preprocessor.tokenize_examples({"messages": [conversation]})
    pieces = [
        ("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n", 0.0),
        ("Yo<end_of_turn>", 1.0),
        ("\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n", 0.0),
        ("Ciao<end_of_turn>", 1.0),
    ]
    expected_ids, expected_weights = [2], [0.0]
    for text, weight in pieces:
        piece_ids = tokenizer.tokenize(text)
        expected_ids += piece_ids
        expected_weights += [weight] * len(piece_ids)
    assert ids == expected_ids
    assert weights == expected_weights
    for bad, message in [
        ([{"role": "system", "content": "x"}, {"role": "model", "content": "y"}], "followed by"),
        ([{"role": "system", "content": "x"}], "followed by"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "user", "content": "a"}], "ends on a user turn"),
    ]:
        with pytest.raises(ValueError, match=message):
            preprocessor({"messages": [bad]})
    with pytest.raises(ValueError, match="non-empty list of conversations"):
        preprocessor({"messages": []})
    with pytest.raises(ValueError, match="A conversation must be a non-empty list"):
        preprocessor({"messages": [[]]})
