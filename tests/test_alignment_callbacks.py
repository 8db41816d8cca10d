"""The alignment callbacks, in plain `fit`s (a tiny regression model, SFT)."""

import csv
import os

import keras
import numpy as np
import pytest
from conftest import make_backbone
from helpers import assert_close
from helpers import to_numpy
from keras import ops

from keras_gemma import GemmaCausalLM
from keras_gemma import GemmaCausalLMPreprocessor
from keras_gemma.alignment.callbacks import AdaptiveKLController
from keras_gemma.alignment.callbacks import GenerateSamples
from keras_gemma.alignment.callbacks import LoRACheckpoint
from keras_gemma.alignment.callbacks import StopOnDivergence
from keras_gemma.alignment.callbacks import batch_value


class KLLogging(keras.Model):
    """Regression whose second input column is logged as `kl`, one value a batch."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)
        self.kl_tracker = keras.metrics.Mean(name="kl")
        self.kl_coefficient = 0.1

    def call(self, x):
        return self.dense(x[:, :1])

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        self.kl_tracker.update_state(ops.mean(x[:, 1]))
        return ops.mean((y_pred[:, 0] - y) ** 2)


def _data(kls, nan_at=None):
    """Batches of 2 rows; batch i logs `kl = kls[i]`, and a NaN target at `nan_at`."""
    x = np.ones((2 * len(kls), 2), "float32")
    x[:, 1] = np.repeat(kls, 2)
    y = np.zeros(2 * len(kls), "float32")
    if nan_at is not None:
        y[2 * nan_at] = np.nan
    return x, y


def _fit(model, x, y, callbacks, epochs=1):
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    return model.fit(
        x, y, batch_size=2, shuffle=False, epochs=epochs, verbose=0, callbacks=callbacks
    )


def test_batch_value_undoes_keras_running_means():
    values = [3.0, 1.0, 8.0, 4.0]
    means = np.cumsum(values) / np.arange(1, 5)
    previous = [None, *means[:-1]]
    assert [batch_value(m, p, b) for b, (m, p) in enumerate(zip(means, previous))] == values


def test_adaptive_kl_moves_beta_toward_the_target():
    controller = AdaptiveKLController(target=4.0, horizon=100, samples_per_step=10)
    assert controller.update(1.0, kl=4.4, samples=10) == pytest.approx(1.01)
    assert controller.update(1.0, kl=400.0, samples=10) == pytest.approx(1.02)  # clipped
    assert controller.update(1.0, kl=0.0, samples=10) == pytest.approx(0.98)
    model = KLLogging()
    kls = [8.0, 8.0, 1.0, 4.0]
    _fit(model, *_data(kls), [controller])
    expected = 0.1
    for kl in kls:
        expected = controller.update(expected, kl, 10)
    assert model.kl_coefficient == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="positive"):
        AdaptiveKLController(target=0.0)


def test_stop_on_nan_restores_the_last_good_weights():
    model = KLLogging()
    weights = []

    class Recorder(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            # `self.model` brings JAX's training state back into the variables.
            weights.append([to_numpy(v).copy() for v in self.model.trainable_variables])

    recorder = Recorder()
    stop = StopOnDivergence()
    _fit(model, *_data([0.0] * 6, nan_at=2), [recorder, stop], epochs=2)
    assert stop.stopped_at == 3 and "loss" in stop.reason
    assert len(weights) == 3 and not np.isfinite(weights[2][0]).all()
    for variable, good in zip(model.trainable_variables, weights[1]):
        assert_close(variable, good, atol=0)


def test_stop_on_kl_above_a_bound():
    model = KLLogging()
    stop = StopOnDivergence(max_kl=10.0)
    # Running means stay below 10 at the third batch; its own KL is 20.
    _fit(model, *_data([1.0, 1.0, 20.0, 1.0]), [stop])
    assert stop.stopped_at == 3 and "kl 20" in stop.reason


def _sft_model(tokenizer, lora=False):
    lm = GemmaCausalLM(make_backbone("mqa"), GemmaCausalLMPreprocessor(tokenizer, 16))
    if lora:
        lm.backbone.enable_lora(2)
    lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    return lm


def test_lora_checkpoints_every_n_steps_atomically(tokenizer, tmp_path):
    lm = _sft_model(tokenizer, lora=True)
    checkpoint = LoRACheckpoint(tmp_path, every_n_steps=2, keep=2)
    lm.fit(["the quick brown fox"] * 10, batch_size=2, epochs=1, verbose=0, callbacks=[checkpoint])
    names = sorted(os.listdir(tmp_path))
    # Steps 2, 4 and the end (5), the oldest removed; no temporary left.
    assert names == ["lora_step_0000004.safetensors", "lora_step_0000005.safetensors"]
    fresh = make_backbone("mqa")
    fresh.load_lora_weights(tmp_path / names[-1])
    for trained, loaded in zip(lm.backbone.trainable_weights, fresh.trainable_weights):
        assert_close(loaded, trained, atol=0)


def test_generate_samples_into_logs_and_history(tokenizer, tmp_path):
    lm = _sft_model(tokenizer)
    samples = GenerateSamples(["the quick", "a journey"], max_length=10, into_logs=True)
    log = tmp_path / "log.csv"
    history = lm.fit(
        ["the quick brown fox"] * 4,
        batch_size=2,
        epochs=2,
        verbose=0,
        callbacks=[samples, keras.callbacks.CSVLogger(log)],
    )
    assert len(samples.samples) == 4 and [s[0] for s in samples.samples] == [2, 2, 4, 4]
    assert all(isinstance(text, str) for text in history.history["samples"])
    with open(log) as f:
        assert [row["samples"] for row in csv.DictReader(f)] == history.history["samples"]
    every = GenerateSamples("the", max_length=8, every_n_steps=3)
    lm.fit(["the quick brown fox"] * 8, batch_size=2, verbose=0, callbacks=[every])
    assert [s[0] for s in every.samples] == [3]


def test_generate_samples_to_tensorboard_text(tokenizer, tmp_path):
    pytest.importorskip("tensorboard")
    lm = _sft_model(tokenizer)
    samples = GenerateSamples(["the quick"], max_length=10, log_dir=str(tmp_path))
    lm.fit(["the quick brown fox"] * 2, batch_size=2, verbose=0, callbacks=[samples])
    assert os.listdir(tmp_path / "samples")
