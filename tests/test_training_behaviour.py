"""Training behaviour users rely on: validation loss, dropout, the recipes'
weight decay, start/end tokens and truncation of long examples."""

import pathlib
import sys

import keras
import numpy as np
from conftest import make_backbone
from helpers import to_numpy

from keras_gemma import GemmaCausalLM
from keras_gemma import GemmaCausalLMPreprocessor
from keras_gemma import token_log_probabilities

TRAINING = pathlib.Path(__file__).resolve().parents[1] / "training"

TRAIN = ["The quick brown fox jumps over the lazy dog.", "Peter Piper picked a peck."] * 4
VALIDATION = {
    "prompts": ["What is 12 plus 30?", "To be, or not to be"],
    "responses": ["12 plus 30 is 42.", "that is the question."],
}


def _token_loss(lm, x, y, sample_weight):
    """Mean cross-entropy over the weighted tokens, computed by hand (inference mode)."""
    log_probs = to_numpy(token_log_probabilities(lm(x, training=False), y))
    return float(-(log_probs * sample_weight).sum() / sample_weight.sum())


def test_fit_validation_loss_is_the_inference_loss_on_the_validation_data(tokenizer):
    # Dropout on: validation must run in inference mode, as `evaluate` does.
    backbone = make_backbone("mqa", seed=3, dropout=0.3)
    lm = GemmaCausalLM(backbone, GemmaCausalLMPreprocessor(tokenizer, 24))
    lm.compile(optimizer=keras.optimizers.SGD(0.05))
    history = lm.fit(TRAIN, validation_data=VALIDATION, batch_size=8, epochs=2, verbose=0)
    val_loss = history.history["val_loss"][-1]
    # One batch holds the whole validation set, so its loss is one weighted mean.
    expected = _token_loss(lm, *lm.preprocessor(VALIDATION))
    np.testing.assert_allclose(val_loss, expected, rtol=1e-4)
    evaluated = lm.evaluate(VALIDATION, batch_size=8, verbose=0, return_dict=True)["loss"]
    np.testing.assert_allclose(val_loss, evaluated, rtol=1e-5)
    # The training loss is not the validation loss (the data did go to its own pass).
    assert abs(history.history["loss"][-1] - val_loss) > 1e-3


def test_dropout_is_active_in_training_only(tokenizer):
    inputs = GemmaCausalLMPreprocessor(tokenizer, 16)(["The quick brown fox"])[0]
    with_dropout = make_backbone("gqa", seed=4, dropout=0.5)
    without = make_backbone("gqa", seed=4)
    without.set_weights(with_dropout.get_weights())
    first = to_numpy(with_dropout(inputs, training=True))
    second = to_numpy(with_dropout(inputs, training=True))
    assert np.abs(first - second).max() > 1e-3  # fresh masks each call
    inference = to_numpy(with_dropout(inputs, training=False))
    np.testing.assert_array_equal(inference, to_numpy(with_dropout(inputs, training=False)))
    np.testing.assert_allclose(inference, to_numpy(without(inputs)), atol=1e-5)
    assert np.abs(first - inference).max() > 1e-3


def test_recipe_adamw_does_not_decay_norm_scales():
    """Zero gradients: Adam's step is zero, so only weight decay moves the
    weights. Every norm scale keeps its value; every other weight shrinks by
    exactly `1 - learning_rate * weight_decay`."""
    sys.path.insert(0, str(TRAINING))
    try:
        import recipe_common
    finally:
        sys.path.remove(str(TRAINING))
    backbone = make_backbone("mqa", seed=5)
    variables = backbone.trainable_variables
    before = [to_numpy(v) for v in variables]
    optimizer = recipe_common.make_optimizer(0.1, total_steps=10, warmup_steps=0, weight_decay=0.5)
    optimizer.apply_gradients([(keras.ops.zeros(v.shape, v.dtype), v) for v in variables])
    scales = [v.path for v in variables if v.path.endswith("scale")]
    # Each layer's two RMSNorms and the final one.
    assert len(scales) == 2 * backbone.num_layers + 1, scales
    for v, old in zip(variables, before):
        expected = old if v.path.endswith("scale") else old * (1 - 0.1 * 0.5)
        np.testing.assert_allclose(to_numpy(v), expected, rtol=1e-6, err_msg=v.path)


def test_without_start_and_end_tokens(tokenizer):
    text = "The quick brown fox"
    ids = tokenizer.tokenize(text)
    bare = GemmaCausalLMPreprocessor(tokenizer, 16, add_start_token=False, add_end_token=False)
    x, y, weight = bare([text])
    n = len(ids)
    assert x["token_ids"][0, :n].tolist() == ids
    assert x["padding_mask"][0].tolist() == [1] * n + [0] * (16 - n)
    assert y[0, : n - 1].tolist() == ids[1:]
    assert weight[0].tolist() == [1.0] * (n - 1) + [0.0] * (17 - n)  # no <eos> target
    # Only the start token: <bos> first, no <eos> target.
    start_only = GemmaCausalLMPreprocessor(tokenizer, 16, add_end_token=False)
    x, y, weight = start_only([text])
    assert x["token_ids"][0, : n + 1].tolist() == [tokenizer.start_token_id] + ids
    assert tokenizer.end_token_id not in y[0].tolist()
    assert weight[0].sum() == n
    # Prompt/response pairs: the response carries the weight, without <eos>.
    [(pair, pair_weights)] = bare.tokenize_examples({"prompts": ["Hi"], "responses": [text]})
    assert pair == tokenizer.tokenize("Hi") + ids
    assert pair_weights == [0.0] * len(tokenizer.tokenize("Hi")) + [1.0] * n
    # Generation prompts have no <bos> either.
    batch = bare.generate_preprocess([text], sequence_length=16)
    assert batch["token_ids"][0, :n].tolist() == ids
    assert batch["padding_mask"][0].sum() == n


def test_long_prompt_response_pairs_are_cut_at_the_end(tokenizer):
    """A pair longer than the row keeps `<bos>`, the prompt and the start of
    the response; the end of the response and its `<eos>` are cut, and the
    weights are cut with them. A prompt that fills the row leaves no target."""
    length = 20
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, length)
    prompt, response = "What is 12 plus 30?", "In 1969, 3 astronauts flew 384400 kilometres."
    prompt_ids, response_ids = tokenizer.tokenize(prompt), tokenizer.tokenize(response)
    full = [tokenizer.start_token_id] + prompt_ids + response_ids + [tokenizer.end_token_id]
    assert len(prompt_ids) + 1 < length < len(full) - 1
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 4
    x, y, weight = preprocessor({"prompts": [prompt, long_prompt], "responses": [response, "ok"]})
    assert x["token_ids"].shape == (2, length)
    assert x["token_ids"][0].tolist() == full[:length]
    assert y[0].tolist() == full[1 : length + 1]
    assert tokenizer.end_token_id not in y[0].tolist()
    assert x["padding_mask"].tolist() == [[1] * length] * 2
    expected = [0.0] * len(prompt_ids) + [1.0] * (length - len(prompt_ids))
    assert weight[0].tolist() == expected
    assert weight[1].sum() == 0  # the response never made it into the row


def test_each_dropout_site_is_active_in_training(tokenizer):
    """Attention-probability dropout and residual dropout each act on their
    own (the other switched off on the built layers)."""
    inputs = GemmaCausalLMPreprocessor(tokenizer, 16)(["The quick brown fox"])[0]
    for site in ("attention", "residual"):
        backbone = make_backbone("mha", seed=6, dropout=0.5)
        for block in backbone.transformer_layers:
            if site == "attention":
                block.dropout = 0.0  # the residual branches skip their dropout
            else:
                block.attention.dropout = 0.0
        first = to_numpy(backbone(inputs, training=True))
        second = to_numpy(backbone(inputs, training=True))
        assert np.abs(first - second).max() > 1e-3, site
        inference = to_numpy(backbone(inputs, training=False))
        np.testing.assert_array_equal(inference, to_numpy(backbone(inputs, training=False)))
