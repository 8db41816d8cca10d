"""Supervised fine-tuning: conversations, packing, the chunked loss, remat."""

import keras
import numpy as np
import pytest
from conftest import make_backbone
from helpers import assert_close
from helpers import to_numpy
from helpers import value_and_gradients

from keras_gemma import GemmaCausalLM
from keras_gemma import GemmaCausalLMPreprocessor
from keras_gemma import token_log_probabilities
from keras_gemma.losses import chunked_cross_entropy
from keras_gemma.losses import take_labels

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What color is a banana?"},
    {"role": "assistant", "content": "A banana is yellow."},
    {"role": "user", "content": "And the sea?"},
    {"role": "model", "content": "The sea is blue."},
]


def test_conversation_weights_cover_model_turns_with_end_of_turn(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=96)
    [(ids, weights)] = preprocessor.tokenize_examples({"messages": [CONVERSATION]})
    # Independent truth: the template written out by hand, piece by piece.
    pieces = [
        ("<start_of_turn>user\nAnswer briefly.\n\nWhat color is a banana?<end_of_turn>\n"
         "<start_of_turn>model\n", 0.0),
        ("A banana is yellow.<end_of_turn>", 1.0),
        ("\n<start_of_turn>user\nAnd the sea?<end_of_turn>\n<start_of_turn>model\n", 0.0),
        ("The sea is blue.<end_of_turn>", 1.0),
    ]
    expected_ids, expected_weights = [tokenizer.start_token_id], [0.0]
    for text, weight in pieces:
        piece_ids = tokenizer.tokenize(text)
        expected_ids += piece_ids
        expected_weights += [weight] * len(piece_ids)
    assert ids == expected_ids
    assert weights == expected_weights
    replies = [i for i, w in zip(ids, weights) if w]
    assert replies.count(tokenizer.end_of_turn_id) == 2
    assert tokenizer.detokenize(replies) == (
        "A banana is yellow.<end_of_turn>The sea is blue.<end_of_turn>"
    )
    # The whole conversation decodes to Gemma's template.
    assert tokenizer.detokenize(ids).startswith("<start_of_turn>user\nAnswer briefly.")

    x, labels, sample_weight = preprocessor({"messages": [CONVERSATION]})
    # Shifted by one: the weight of predicting labels[t] is weights[t + 1].
    n = len(ids) - 1
    np.testing.assert_array_equal(labels[0, :n], ids[1:])
    np.testing.assert_array_equal(sample_weight[0, :n], weights[1:])
    assert sample_weight[0, n:].sum() == 0


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "non-empty list"),
        ([{"role": "user", "content": "Hi"}], "ends on a user turn"),
        ([{"role": "robot", "content": "Hi"}], "unknown role 'robot'"),
        ([{"role": "user", "content": 3}], "must be a string"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "model", "content": "a"}], "alternate"),
        ([{"role": "user"}], "'role' and 'content'"),
    ],
)
def test_bad_conversations_name_the_problem(tokenizer, messages, message):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    with pytest.raises((ValueError, TypeError), match=message):
        preprocessor({"messages": [messages]})


def _assert_gradients_close(actual, expected):
    # float32 sums of terms as large as the largest gradient entry: 1e-5 of it.
    assert_close(actual, expected, atol=1e-5 * max(1.0, np.abs(expected).max()))


def _weighted_sums(lm, inputs, labels, weights):
    log_probs = token_log_probabilities(lm(inputs), labels)
    return -keras.ops.sum(log_probs * keras.ops.convert_to_tensor(weights))


def test_packed_batch_equals_examples_one_by_one(tokenizer):
    lm = GemmaCausalLM(make_backbone("gqa"))
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=32, packing=True)
    data = {
        "prompts": ["What is 12 plus 30?", "Hi", "The quick brown fox", "To be"],
        "responses": ["42", "Hello there, friend.", "jumps over the lazy dog.", "or not"],
    }
    examples = preprocessor.tokenize_examples(data)
    inputs, labels, weights = preprocessor.pack(examples)
    assert len(inputs["token_ids"]) < len(examples)  # rows are really shared
    assert inputs["segment_ids"].max() >= 2

    def packed():
        return _weighted_sums(lm, inputs, labels, weights)

    def one_by_one():
        total = 0.0
        for ids, w in examples:
            ids = np.array([ids])
            row = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}
            total = total + _weighted_sums(lm, row, ids[:, 1:], np.array([w[1:]], "float32"))
        return total

    variables = lm.trainable_variables
    packed_value, packed_grads = value_and_gradients(packed, variables)
    alone_value, alone_grads = value_and_gradients(one_by_one, variables)
    assert_close(packed_value, alone_value, atol=1e-5, rtol=1e-6)
    for a, b in zip(packed_grads, alone_grads):
        _assert_gradients_close(a, b)


def test_chunked_loss_equals_the_plain_loss_and_gradients():
    backbone = make_backbone("mqa")
    lm = GemmaCausalLM(backbone)
    rng = np.random.default_rng(0)
    inputs = {"token_ids": rng.integers(0, 384, (2, 11)), "padding_mask": np.ones((2, 11), "int32")}
    labels = rng.integers(0, 384, (2, 11))
    weights = rng.integers(0, 2, (2, 11)).astype("float32")

    def chunked():
        hidden = backbone(inputs)
        return chunked_cross_entropy(lm.compute_logits, hidden, labels, weights, chunk_size=3)[0]

    def plain():
        return _weighted_sums(lm, inputs, labels, weights)

    chunked_value, chunked_grads = value_and_gradients(chunked, lm.trainable_variables)
    plain_value, plain_grads = value_and_gradients(plain, lm.trainable_variables)
    assert_close(chunked_value, plain_value, atol=1e-5, rtol=1e-6)
    for a, b in zip(chunked_grads, plain_grads):
        _assert_gradients_close(a, b)


def test_take_labels_picks_by_label_and_scatters_its_gradient():
    rng = np.random.default_rng(3)
    values = keras.Variable(rng.standard_normal((2, 3, 5)).astype("float32"))
    labels = rng.integers(0, 5, (2, 3))
    coefficients = rng.standard_normal((2, 3)).astype("float32")
    # Independent truth: numpy's indexing, and the gradient scattered by hand.
    expected = np.take_along_axis(to_numpy(values), labels[..., None], -1)[..., 0]
    np.testing.assert_array_equal(to_numpy(take_labels(to_numpy(values), labels)), expected)
    weights = keras.ops.convert_to_tensor(coefficients)
    _, [gradient] = value_and_gradients(
        lambda: keras.ops.sum(take_labels(values.value, labels) * weights), [values]
    )
    expected_gradient = np.zeros((2, 3, 5), "float32")
    np.put_along_axis(expected_gradient, labels[..., None], coefficients[..., None], -1)
    np.testing.assert_allclose(gradient, expected_gradient, atol=1e-7)


def test_take_labels_gives_nan_for_a_label_outside_the_vocabulary():
    values = np.arange(6, dtype="float32").reshape(2, 3)
    picked = to_numpy(take_labels(values, np.array([-1, 3])))
    # Never the neighbouring row's value, which a flat index would read.
    assert np.isnan(picked).all()
    np.testing.assert_array_equal(to_numpy(take_labels(values, np.array([2, 0]))), [2.0, 3.0])


def test_gradient_checkpointing_keeps_loss_and_gradients():
    backbone = make_backbone("mha", dropout=0.0)
    lm = GemmaCausalLM(backbone)
    rng = np.random.default_rng(1)
    inputs = {"token_ids": rng.integers(0, 384, (2, 9)), "padding_mask": np.ones((2, 9), "int32")}
    labels = rng.integers(0, 384, (2, 9))

    def loss():
        hidden = backbone(inputs, training=True)
        return chunked_cross_entropy(lm.compute_logits, hidden, labels)[0]

    plain = value_and_gradients(loss, lm.trainable_variables)
    backbone.gradient_checkpointing = True
    remat = value_and_gradients(loss, lm.trainable_variables)
    assert_close(remat[0], plain[0], atol=1e-5, rtol=1e-6)
    for a, b in zip(remat[1], plain[1]):
        _assert_gradients_close(a, b)


def test_default_loss_is_the_token_mean_over_weighted_tokens(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=24)
    lm = GemmaCausalLM(make_backbone("mqa"), preprocessor)
    lm.loss_chunk_size = 5  # several chunks
    data = {"prompts": ["What is 12 plus 30?", "Hi"], "responses": ["42", "Hello there."]}
    loss, accuracy = lm.evaluate(data, batch_size=2, verbose=0)
    x, labels, weights = preprocessor(data)
    logits = to_numpy(lm(x))
    log_probs = to_numpy(token_log_probabilities(logits, labels))
    expected = -(log_probs * weights).sum() / weights.sum()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    expected_accuracy = ((logits.argmax(-1) == labels) * weights).sum() / weights.sum()
    np.testing.assert_allclose(accuracy, expected_accuracy, rtol=1e-6)
    # `lm(x)` outside fit/evaluate still gives logits.
    assert logits.shape[-1] == tokenizer.vocabulary_size()


def test_fit_on_conversations_learns_the_replies(tokenizer):
    keras.utils.set_random_seed(0)
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=48)
    lm = GemmaCausalLM(make_backbone("mqa"), preprocessor)
    lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    data = {"messages": [CONVERSATION[1:3], CONVERSATION[1:]]}
    history = lm.fit(data, batch_size=2, epochs=15, verbose=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
    assert "accuracy" in history.history


def test_fit_packs_the_dataset_once(tokenizer):
    from keras_gemma.data import PreprocessedBatches

    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=32, packing=True)
    data = {"prompts": ["Hi", "What is 12 plus 30?"] * 6, "responses": ["Hello.", "42"] * 6}
    batches = PreprocessedBatches(data, preprocessor, batch_size=2, shuffle=True, seed=0)
    rows = sum(len(batches[i][1]) for i in range(len(batches)))
    assert rows < 12
    # Every example's response tokens are trained on exactly once.
    total_weight = sum(batches[i][2].sum() for i in range(len(batches)))
    _, _, plain_weights = GemmaCausalLMPreprocessor(tokenizer, 32)(data)
    assert total_weight == plain_weights.sum()
    lm = GemmaCausalLM(make_backbone("mqa"), preprocessor)
    history = lm.fit(data, batch_size=2, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "empty"),
        ({"prompts": ["a", "b"], "responses": ["c"]}, "one entry per example"),
        (["a", 3], "item 1 is int"),
        ({"messages": [[{"role": "user", "content": "Hi"}]]}, "ends on a user turn"),
    ],
)
def test_bad_training_data_names_the_fix(tokenizer, data, message):
    lm = GemmaCausalLM(make_backbone("mqa"), GemmaCausalLMPreprocessor(tokenizer, 16))
    with pytest.raises((ValueError, TypeError), match=message):
        lm.fit(data, batch_size=2, verbose=0)


def test_saving_a_preset_with_unmerged_lora_names_the_fix(tmp_path):
    lm = GemmaCausalLM(make_backbone("mqa"))
    lm.backbone.enable_lora(2)
    with pytest.raises(ValueError, match="merge_lora"):
        lm.save_to_preset(tmp_path / "preset")
    assert not (tmp_path / "preset").exists()
    lm.backbone.merge_lora()
    lm.save_to_preset(tmp_path / "preset")


def test_shipped_toy_preset_loads_by_name_and_answers_held_out_questions():
    import json
    import pathlib

    from keras_gemma import format_turns

    lm = GemmaCausalLM.from_preset("toy_gemma")
    heldout = pathlib.Path(__file__).parents[1] / "presets/toy_gemma/heldout.jsonl"
    rows = [json.loads(line) for line in heldout.open()]
    rows = [r for r in rows if r["task"] in ("sort", "reverse")][:8]
    prompts = [format_turns([("user", r["question"])]) for r in rows]
    answers = lm.generate(prompts, max_length=64, strip_prompt=True)
    # The expected answers are the program's, independent of the model;
    # the preset scores 92-94% on these two tasks.
    right = sum(a.strip() == r["answer"] for a, r in zip(answers, rows))
    assert right >= 6, list(zip(answers, [r["answer"] for r in rows]))


def test_every_training_entry_point_computes_the_default_loss(tokenizer):
    """`fit`, `train_on_batch`, `test_on_batch` and a custom `compute_loss`
    call on logits all give the token-mean loss."""
    lm = GemmaCausalLM(make_backbone("mqa"))
    lm.compile(optimizer=keras.optimizers.SGD(0.0))
    rng = np.random.default_rng(2)
    x = {"token_ids": rng.integers(0, 384, (2, 7)), "padding_mask": np.ones((2, 7), "int32")}
    y = rng.integers(0, 384, (2, 7))
    w = rng.integers(0, 2, (2, 7)).astype("float32")
    w[0, 0] = 1.0
    log_probs = to_numpy(token_log_probabilities(lm(x), y))
    expected = -(log_probs * w).sum() / w.sum()
    on_batch = lm.train_on_batch(x, y, sample_weight=w, return_dict=True)["loss"]
    np.testing.assert_allclose(on_batch, expected, rtol=1e-5)
    tested = lm.test_on_batch(x, y, sample_weight=w, return_dict=True)["loss"]
    np.testing.assert_allclose(tested, expected, rtol=1e-5)
    direct = to_numpy(lm.compute_loss(x, y, lm(x), w))
    np.testing.assert_allclose(direct, expected, rtol=1e-5)
