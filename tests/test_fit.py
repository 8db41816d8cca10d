import json
import pathlib

import keras
import numpy as np
import pytest
from conftest import make_backbone
from helpers import to_numpy

from keras_gemma import GemmaCausalLM
from keras_gemma import GemmaCausalLMPreprocessor

DATA = pathlib.Path(__file__).parents[1] / "training" / "data" / "tiny_sft.jsonl"


def _examples(n):
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:n]]
    return {"prompts": [r["prompt"] for r in rows], "responses": [r["response"] for r in rows]}


def _lm(tokenizer, dtype=None, sequence_length=32):
    backbone = make_backbone("mqa", seed=0, dtype=dtype)
    return GemmaCausalLM(backbone, GemmaCausalLMPreprocessor(tokenizer, sequence_length))


def test_fit_on_strings_lowers_the_loss(tokenizer):
    texts = [p + " " + r for p, r in zip(*_examples(16).values())]
    lm = _lm(tokenizer)
    lm.compile(optimizer=keras.optimizers.Adam(5e-3))
    history = lm.fit(texts, batch_size=8, epochs=8, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.8 * losses[0], losses


def test_fit_on_prompt_response_pairs_lowers_response_loss(tokenizer):
    data = _examples(16)
    lm = _lm(tokenizer)
    lm.compile(optimizer=keras.optimizers.Adam(5e-3))
    before = lm.evaluate(data, batch_size=8, verbose=0, return_dict=True)["loss"]
    lm.fit(data, batch_size=8, epochs=8, verbose=0)
    after = lm.evaluate(data, batch_size=8, verbose=0, return_dict=True)["loss"]
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize(
    "dtype, variable_dtype",
    [("float32", "float32"), ("bfloat16", "bfloat16"), ("mixed_bfloat16", "float32")],
)
def test_fit_runs_in_each_dtype(tokenizer, dtype, variable_dtype):
    lm = _lm(tokenizer, dtype=dtype, sequence_length=16)
    if dtype == "bfloat16":
        # Pure bfloat16 weights round away small updates (and Keras's Adam
        # makes none): plain SGD with a large step shows gradients flow.
        lm.compile(optimizer=keras.optimizers.Adam())
        with pytest.warns(UserWarning, match="mixed_bfloat16"):
            lm.fit(["The fox."], batch_size=1, verbose=0)
        lm.compile(optimizer=keras.optimizers.SGD(0.5))
    else:
        lm.compile()  # the defaults
    before = [to_numpy(keras.ops.cast(w, "float32")).copy() for w in lm.trainable_weights]
    history = lm.fit(["The quick brown fox."] * 4, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = [to_numpy(keras.ops.cast(w, "float32")) for w in lm.trainable_weights]
    changed = sum(not np.array_equal(b, a) for b, a in zip(before, after))
    assert changed == len(before)
    assert keras.backend.standardize_dtype(lm.backbone.weights[0].dtype) == variable_dtype


def test_fit_on_tf_data_pipeline(tokenizer):
    tf = pytest.importorskip("tensorflow")
    data = _examples(8)
    dataset = tf.data.Dataset.from_tensor_slices(data).batch(4)
    lm = _lm(tokenizer, sequence_length=24)
    history = lm.fit(dataset, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_fit_on_token_arrays_without_preprocessor(tokenizer):
    lm = GemmaCausalLM(make_backbone("mha"))
    x, y, sample_weight = GemmaCausalLMPreprocessor(tokenizer, 16)(["The fox.", "A dog."])
    history = lm.fit(x, y, sample_weight=sample_weight, batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    with pytest.raises(ValueError, match="no preprocessor"):
        lm.fit(["raw text"], verbose=0)
