"""Keras callbacks that make training observable and safe: sample generation,
an adaptive KL coefficient, a stop on divergence, LoRA checkpoints.

Plain `keras.callbacks.Callback`s: they work in any `fit`, supervised
fine-tuning of a `GemmaCausalLM` included. Where they need the language
model they take the fitted model's `policy` (a `GemmaPolicyOptimizer`) or
the model itself (a `GemmaCausalLM`).

Keras hands `on_train_batch_end` the running means of the epoch so far;
`batch_value` recovers the latest batch's own value from two of them.
"""

import math
import os

import keras
import numpy as np


def _language_model(model):
    lm = getattr(model, "policy", model)
    if not hasattr(lm, "generate"):
        raise ValueError(
            f"This callback needs a language model: a GemmaCausalLM or a model with a "
            f"`policy`; the fitted model is a {type(model).__name__}."
        )
    return lm


def batch_value(running_mean, previous_mean, batch):
    """The value of batch `batch` (0-based within the epoch) from the epoch's
    running mean after it and before it (Keras's batch logs are running means).

    Example:
    >>> batch_value(running_mean=2.0, previous_mean=1.0, batch=1)  # values 1, 3
    3.0
    """
    if batch == 0 or previous_mean is None:
        return float(running_mean)
    return float((batch + 1) * running_mean - batch * previous_mean)


class _BatchValues:
    """Recovers per-batch values of logged keys across `on_train_batch_end` calls."""

    def __init__(self):
        self.previous = {}

    def __call__(self, batch, logs, key):
        if key not in logs:
            return None
        if batch == 0:
            self.previous = {}
        value = batch_value(logs[key], self.previous.get(key), batch)
        self.previous[key] = float(logs[key])
        return value


class GenerateSamples(keras.callbacks.Callback):
    """Generates from fixed prompts every `every_n_steps` steps (or at each
    epoch's end) to watch what training does to the model's outputs.

    The texts go to `self.samples` (a list of `(step, prompt, text)`), to a
    TensorBoard text summary under `log_dir` (the "Text" tab; needs the
    `tensorboard` package) and, with `into_logs=True`, to the logs under the
    key `"samples"`: `History` and `CSVLogger` keep them; Keras's progress bar
    and `TensorBoard` callback expect numbers there, so use `log_dir`
    instead of `into_logs` with them.

    Args:
        prompts: a list of prompt strings.
        max_length: total tokens per sample, prompt included.
        every_n_steps: generate every this many train steps; None: once per epoch.
        log_dir: optional TensorBoard directory.
        into_logs: also add the samples to the logs.

    Samples use the model's sampler (in `GemmaPolicyOptimizer.fit`, the
    rollouts' temperature sampling).

    Example:
    >>> callback = GenerateSamples(["Tell me a joke"], max_length=32, every_n_steps=50)
    >>> callback.samples
    []
    """

    def __init__(self, prompts, max_length=64, every_n_steps=None, log_dir=None, into_logs=False):
        super().__init__()
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("`prompts` must be a non-empty list of strings.")
        self.prompts = list(prompts)
        self.max_length = max_length
        self.every_n_steps = every_n_steps
        self.log_dir = log_dir
        self.into_logs = into_logs
        self.samples = []
        self._step = 0
        self._writer = None

    def generate(self):
        """Generates one sample per prompt with the current weights; returns the texts."""
        lm = _language_model(self.model)
        texts = lm.generate(self.prompts, max_length=self.max_length, strip_prompt=True)
        self.samples.extend((self._step, p, t) for p, t in zip(self.prompts, texts))
        if self.log_dir is not None:
            self._write(texts)
        return texts

    def _write(self, texts):
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "samples"))
        table = "\n\n".join(f"**{p}**\n\n{t}" for p, t in zip(self.prompts, texts))
        with self._writer.as_default():
            tf.summary.text("samples", table, step=self._step)
        self._writer.flush()

    def _log(self, logs):
        texts = self.generate()
        if self.into_logs and logs is not None:
            logs["samples"] = " | ".join(texts)

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self.every_n_steps and self._step % self.every_n_steps == 0:
            self._log(logs)

    def on_epoch_end(self, epoch, logs=None):
        if not self.every_n_steps:
            self._log(logs)


class AdaptiveKLController(keras.callbacks.Callback):
    """Adapts the KL coefficient β toward a target KL (Ziegler et al. 2019).

    After each step, with `KL` that step's logged `kl` (nats per sequence):
    `β ← β · (1 + clip((KL − target) / target, −0.2, 0.2) · n / horizon)`,
    `n` the number of completions in the step. The fitted model must have a
    `kl_coefficient` attribute (`GemmaPolicyOptimizer`); the next rollout
    uses the new value, and `kl_coefficient` is logged.

    Args:
        target: the KL to aim for, nats per sequence (TRL: 6).
        horizon: completions over which a full relative step is taken (TRL: 10000).
        samples_per_step: completions per step, if the model doesn't say
            (a `GemmaPolicyOptimizer` does, through its last rollout).

    Example:
    >>> controller = AdaptiveKLController(target=6.0, horizon=10000)
    >>> round(controller.update(beta=0.1, kl=12.0, samples=100), 6)  # clipped at +20%
    0.1002
    """

    def __init__(self, target=6.0, horizon=10000, samples_per_step=None):
        super().__init__()
        if target <= 0 or horizon <= 0:
            raise ValueError(
                f"`target` and `horizon` must be positive. Received {target}, {horizon}."
            )
        self.target = target
        self.horizon = horizon
        self.samples_per_step = samples_per_step
        self._values = _BatchValues()

    def update(self, beta, kl, samples):
        """The new β after a step with KL `kl` over `samples` completions."""
        error = min(max((kl - self.target) / self.target, -0.2), 0.2)
        return beta * (1.0 + error * samples / self.horizon)

    def on_train_batch_end(self, batch, logs=None):
        kl = self._values(batch, logs or {}, "kl")
        if kl is None or not math.isfinite(kl):
            return
        model = self.model
        if not hasattr(model, "kl_coefficient"):
            raise ValueError(
                "AdaptiveKLController needs a model with a `kl_coefficient` (GemmaPolicyOptimizer)."
            )
        samples = self.samples_per_step
        if samples is None:
            rollout = getattr(model, "last_rollout", None)
            samples = len(rollout["rewards"]) if rollout else 1
        model.kl_coefficient = float(self.update(model.kl_coefficient, kl, samples))


class StopOnDivergence(keras.callbacks.Callback):
    """Stops training when a logged value turns NaN or infinite, or the KL
    exceeds a bound, and puts back the weights of the last good step.

    After every good step (every `snapshot_every_n_steps`) it keeps a copy of
    the trainable weights (with LoRA: the adapters only), so a diverged step
    is undone; `stopped_at` says which step (counted over the whole `fit`)
    diverged and why.

    Args:
        max_kl: stop when a step's `kl` log (nats per sequence) exceeds this.
        monitor: the logged values that must stay finite (default: all of them).
        snapshot_every_n_steps: how often to copy the weights.

    Example:
    >>> callback = StopOnDivergence(max_kl=50.0)
    >>> callback.stopped_at is None
    True
    """

    def __init__(self, max_kl=None, monitor=None, snapshot_every_n_steps=1):
        super().__init__()
        self.max_kl = max_kl
        self.monitor = monitor
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.stopped_at = None
        self.reason = None
        self._snapshot = None
        self._step = 0
        self._values = _BatchValues()

    def on_train_begin(self, logs=None):
        self._take_snapshot()

    def _take_snapshot(self):
        self._snapshot = [
            np.array(keras.ops.convert_to_numpy(v)) for v in self.model.trainable_variables
        ]

    def _problem(self, batch, logs):
        names = self.monitor or [
            k for k, v in logs.items() if isinstance(v, (int, float, np.number))
        ]
        for name in names:
            value = logs.get(name)
            if value is not None and not math.isfinite(float(value)):
                return f"{name} is {float(value)}"
        if self.max_kl is not None:
            kl = self._values(batch, logs, "kl")
            if kl is not None and kl > self.max_kl:
                return f"kl {kl:.3g} > max_kl {self.max_kl}"
        return None

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        problem = self._problem(batch, logs or {})
        if problem is None:
            if self._step % self.snapshot_every_n_steps == 0:
                self._take_snapshot()
            return
        model = self.model
        for variable, value in zip(model.trainable_variables, self._snapshot):
            variable.assign(value)
        model.stop_training = True
        self.stopped_at, self.reason = self._step, problem
        print(f"StopOnDivergence: step {self._step}: {problem}; restored the last good weights.")


class LoRACheckpoint(keras.callbacks.Callback):
    """Saves only the LoRA adapters every `every_n_steps` train steps.

    Each file, `directory/lora_step_{step:07d}.safetensors`, is written under
    a temporary name and renamed into place, so a kill mid-write never
    leaves a torn checkpoint (a reader sees the old file or the new one).
    `backbone.load_lora_weights(path)` restores it; `keep` bounds how many
    stay on disk (oldest removed first).

    Args:
        directory: where to write.
        every_n_steps: steps between checkpoints.
        keep: how many checkpoints to keep; None keeps all.
        save_at_end: also save after the last step.

    Example:
    >>> import tempfile
    >>> callback = LoRACheckpoint(tempfile.mkdtemp(), every_n_steps=100, keep=3)
    >>> callback.paths
    []
    """

    def __init__(self, directory, every_n_steps=100, keep=None, save_at_end=True):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be >= 1. Received: {every_n_steps}")
        self.directory = os.fspath(directory)
        self.every_n_steps = every_n_steps
        self.keep = keep
        self.save_at_end = save_at_end
        self.paths = []
        self._step = 0

    def _backbone(self):
        model = self.model
        backbone = getattr(getattr(model, "policy", model), "backbone", None)
        if backbone is None or not hasattr(backbone, "save_lora_weights"):
            raise ValueError(
                f"LoRACheckpoint needs a Gemma model with a backbone; got {type(model).__name__}."
            )
        return backbone

    def save(self):
        """Writes the current adapters; returns the path."""
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"lora_step_{self._step:07d}.safetensors")
        temporary = os.path.join(
            self.directory, f".lora_step_{self._step:07d}.{os.getpid()}.tmp.safetensors"
        )
        try:
            self._backbone().save_lora_weights(temporary)
            os.replace(temporary, path)  # atomic on POSIX and Windows
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        if path not in self.paths:
            self.paths.append(path)
        while self.keep is not None and len(self.paths) > self.keep:
            old = self.paths.pop(0)
            if os.path.exists(old):
                os.remove(old)
        return path

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.every_n_steps == 0:
            self.save()

    def on_train_end(self, logs=None):
        if self.save_at_end and self._step % self.every_n_steps:
            self.save()
