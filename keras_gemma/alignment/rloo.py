"""Policy optimisation driven by `fit`: REINFORCE leave-one-out (RLOO, the
Gemma paper's recipe) and GRPO, with PPO-style clipping as an option.

Each training step is one *rollout → score → update*:

1. **Rollout** (outside the compiled step, no gradient, dropout off): take
   the next `batch_size / num_generations` prompts, sample
   `num_generations` completions of each from the current policy (the
   generation engine, `RandomSampler(temperature)`, one prefill per prompt
   for all its samples), mask each after its
   first end token, and score the completions' per-token log-probabilities
   under the policy and under the reference (`ReferencePolicy`).
2. **Score**: reward each completion (a `GemmaRewardModel` or any callable
   `reward(prompts, completions) -> floats`) and turn the rewards into
   advantages (below), in NumPy.
3. **Update**: `Model.compute_loss` computes the policy-gradient loss from
   the rollout; Keras's own train step takes the gradient on any backend.

The rollout is the training batch: a `keras.utils.PyDataset` (JAX, PyTorch)
or a `tf.data` generator without prefetching (TensorFlow) hands Keras the
batch made for the step about to run, so every rollout uses the weights of
all earlier updates. Keras fetches a batch at different moments per backend
(PyTorch before `on_train_batch_begin`, JAX and TensorFlow inside the train
function), so a rollout is made by whichever comes first of the fetch and an
internal `on_train_batch_begin` callback, and never twice for one step.

Advantages (`algorithm`):
    - `"rloo"`: `r_i' = r_i - β·KL_i` with `KL_i = Σ_t log π − log π_ref`
      over the completion (from the rollout, no gradient through it);
      advantage `r_i' − mean of the other k − 1 r'` in the group (sums to
      zero per group); loss `−A_i · Σ_t ρ_t` per completion, where `ρ_t =
      π/π_old` per token is 1 in value and gives `∇ Σ_t log π`: plain
      REINFORCE with a leave-one-out baseline.
    - `"grpo"`: advantage `(r − mean)/(std + 1e-4)` per group; per-token
      loss `−(ρ_t·A − β·k3_t)` averaged over each completion, with `k3 =
      exp(ref − log π) − (ref − log π) − 1` (its log-ratio clamped to ±20
      so `exp` cannot overflow).

With `num_updates > 1` each rollout serves that many consecutive steps and
`ρ` is clipped to `[1 − ε, 1 + ε]` PPO-style (`min(ρA, clip(ρ)A)`).

A loss near 0 is expected: advantages are centred and `ρ = 1`, but the
gradient is not 0 (TRL #2703). Groups whose completions all got the same
reward give no gradient (their advantages are 0); `frac_reward_zero_std`
reports how many.

Logged (TRL's names): `reward` (mean reward before the KL term and the
truncation penalty), `reward_std` (mean within-group std), `kl` (mean
`Σ_t log π − log π_ref` per completion, nats per sequence), `entropy` (mean
per-token entropy of the policy on completion tokens), `clip_ratio`
(fraction of completion tokens whose ratio was clipped),
`completions/mean_length`, `completions/clipped_ratio` (fraction truncated:
no end token), `frac_reward_zero_std`, `kl_coefficient`, and `loss`.
"""

import contextlib
import math
import warnings

import keras
import numpy as np
from keras import ops

from keras_gemma import samplers
from keras_gemma.alignment.policy import ReferencePolicy
from keras_gemma.alignment.policy import completion_log_probs
from keras_gemma.alignment.policy import completion_mask
from keras_gemma.alignment.policy import penalize_truncated
from keras_gemma.alignment.policy import score_completions
from keras_gemma.alignment.reward_model import check_same_tokenizer
from keras_gemma.preprocessor import as_string_list

ALGORITHMS = ("rloo", "grpo")
# Rollout statistics carried in the batch to `compute_loss`'s metrics, in order.
ROLLOUT_METRICS = (
    "reward",
    "reward_std",
    "kl",
    "entropy",
    "completions/mean_length",
    "completions/clipped_ratio",
    "frac_reward_zero_std",
    "kl_coefficient",
)
# Clamp on log-ratios inside `exp` (k3 KL, importance ratios): exp(20) is
# finite in float32, and a policy that far from its reference is already lost.
_MAX_LOG_RATIO = 20.0


def leave_one_out_advantages(rewards, num_generations):
    """`r_i − mean(r_j, j ≠ i)` within each group of `num_generations`
    consecutive rewards; sums to zero per group.

    Example:
    >>> leave_one_out_advantages(np.array([1.0, 0.0, 2.0, 2.0]), 2).tolist()
    [1.0, -1.0, 0.0, 0.0]
    """
    k = _check_group_size(num_generations, 2, "the leave-one-out baseline")
    groups = np.asarray(rewards, "float32").reshape(-1, k)
    baseline = (groups.sum(axis=1, keepdims=True) - groups) / (k - 1)
    return (groups - baseline).reshape(-1)


def group_normalized_advantages(rewards, num_generations, epsilon=1e-4):
    """GRPO's `(r − group mean) / (group std + epsilon)`, the std unbiased
    as in TRL.

    Example:
    >>> [round(float(a), 3) for a in group_normalized_advantages(np.array([1.0, 0.0, 5.0, 5.0]), 2)]
    [0.707, -0.707, 0.0, 0.0]
    """
    k = _check_group_size(num_generations, 2, "group-normalised advantages")
    groups = np.asarray(rewards, "float32").reshape(-1, k)
    std = groups.std(axis=1, ddof=1, keepdims=True)
    return ((groups - groups.mean(axis=1, keepdims=True)) / (std + epsilon)).reshape(-1)


def _check_group_size(k, minimum, what):
    if isinstance(k, bool) or not isinstance(k, int) or k < minimum:
        raise ValueError(
            f"`num_generations` must be an integer >= {minimum} for {what} (the other "
            f"samples of a prompt are its baseline). Received: {k!r}"
        )
    return k


class _Reward:
    """`reward(prompts, completions) -> float32 [n]`, checked. A plain object,
    so a reward *model* is not tracked (and trained) as part of the policy."""

    def __init__(self, reward, policy):
        self.tokens = None
        if hasattr(reward, "score_tokens"):
            # A reward model reads the rollout's own token rows (ending at
            # `<end_of_turn>` as in its training), never re-tokenized text.
            check_same_tokenizer(reward, policy)
            self.tokens = reward.score_tokens
            self.name = type(reward).__name__
        elif hasattr(reward, "predict"):
            self.function = lambda prompts, completions: reward.predict(
                {"prompts": prompts, "responses": completions}, verbose=0
            )
            self.name = type(reward).__name__
        elif callable(reward):
            self.function = reward
            self.name = getattr(reward, "__name__", type(reward).__name__)
        else:
            raise TypeError(
                "`reward` must be a reward model with `predict({'prompts', 'responses'})` "
                "(e.g. a GemmaRewardModel) or a callable `reward(prompts, completions)` "
                f"returning one float per completion. Received: {type(reward).__name__}"
            )

    def __call__(self, prompts, completions, token_ids=None, padding_mask=None):
        if self.tokens is not None:
            rewards = self.tokens(token_ids, padding_mask)
        else:
            rewards = self.function(list(prompts), list(completions))
        try:
            rewards = np.asarray(ops.convert_to_numpy(rewards), "float32").reshape(-1)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"The reward {self.name} must return numbers, one per completion; "
                f"received {rewards!r:.200}"
            ) from error
        if rewards.shape[0] != len(completions):
            raise ValueError(
                f"The reward {self.name} returned {rewards.shape[0]} values for "
                f"{len(completions)} completions; it must return exactly one per completion."
            )
        bad = np.flatnonzero(~np.isfinite(rewards))
        if bad.size:
            raise ValueError(
                f"The reward {self.name} returned non-finite values (NaN or inf) for "
                f"completions {bad[:10].tolist()}, e.g. {completions[bad[0]]!r:.200}."
            )
        return rewards


class _Rollouts:
    """Makes each step's rollout batch, once, with the weights of that step.

    What a step samples is a function of its global step (the optimizer's
    `iterations`) alone: rollout `r` (serving steps `r * num_updates`
    onwards) takes positions `[r * P, (r + 1) * P)` of an endless stream of
    passes over the prompts (pass `p` a permutation drawn from `(seed, p)`)
    and samples with the seed state `(seed, r)`. So training resumed from a
    backup of the weights and optimizer makes the same rollouts as an
    uninterrupted run, and a second `fit` continues the stream.
    """

    def __init__(self, trainer, prompts, prompts_per_batch, shuffle, steps_per_epoch=None):
        self.trainer = trainer
        self.prompts = prompts
        self.prompts_per_batch = prompts_per_batch
        self.shuffle = shuffle
        policy = trainer.policy
        lengths = [len(ids) for ids in policy.preprocessor.tokenizer.tokenize(prompts)]
        start = int(policy.preprocessor.add_start_token)
        self.width = max(lengths) + start + trainer.max_new_tokens
        self.steps_per_epoch = steps_per_epoch or (
            math.ceil(len(prompts) / prompts_per_batch) * trainer.num_updates
        )
        self._orders = {}
        self.batch = None  # the current rollout
        self.batch_rollout = None  # its rollout number
        self.ready = False  # made for the coming step, not yet fetched
        self.fetched = False  # the current step's batch was fetched
        self.training = False

    def _order(self, data_pass):
        if data_pass not in self._orders:
            indices = np.arange(len(self.prompts))
            if self.shuffle:
                np.random.default_rng([self.trainer.seed, data_pass]).shuffle(indices)
            self._orders = {data_pass: indices}
        return self._orders[data_pass]

    def _prompts_of(self, rollout):
        n, size = self.prompts_per_batch, len(self.prompts)
        positions = range(rollout * n, (rollout + 1) * n)
        return [self.prompts[self._order(p // size)[p % size]] for p in positions]

    def prepare(self):
        """Makes (or reuses) the rollout for the coming step."""
        if self.ready or self.fetched:
            return
        sync = getattr(self.trainer, "jax_state_sync", None)
        if sync is not None:
            sync()  # JAX keeps the weights out of the variables during `fit`
        # The optimizer's step counter is the global step: a restored backup
        # and a second `fit` both continue the stream where it stopped.
        step = int(ops.convert_to_numpy(self.trainer.optimizer.iterations))
        rollout = step // self.trainer.num_updates
        if rollout != self.batch_rollout:
            self.trainer.sampler.seed_generator.state.assign(
                np.array([self.trainer.seed, rollout]).astype(
                    self.trainer.sampler.seed_generator.state.dtype
                )
            )
            self.batch = self.trainer.rollout(self._prompts_of(rollout), self.width)
            self.batch_rollout = rollout
        self.ready = True

    def fetch(self):
        if self.fetched and self.training:
            raise RuntimeError(
                "Keras fetched a second rollout batch before the current train step ran, "
                "so that rollout would use out-of-date weights. Keras's JAX trainer looks "
                "one batch ahead on accelerators unless a distribution is set: call "
                "keras.distribution.set_distribution(keras.distribution.DataParallel()) "
                "before `fit` (its iterator fetches each batch when the step needs it)."
            )
        self.prepare()
        self.ready, self.fetched = False, True
        return self.batch

    def begin_training(self):
        # A batch fetched before training (Keras's build peeks at one) was
        # made with the starting weights: it serves the first step.
        self.ready, self.fetched, self.training = self.batch is not None, False, True

    def end_step(self):
        self.fetched = False

    def signature(self):
        import tensorflow as tf

        n, length = self.prompts_per_batch * self.trainer.num_generations, self.width
        shapes = {
            "token_ids": ((n, length), tf.int32),
            "padding_mask": ((n, length), tf.int32),
            "completion_mask": ((n, length), tf.int32),
            "old_log_probs": ((n, length - 1), tf.float32),
            "reference_log_probs": ((n, length - 1), tf.float32),
            "advantages": ((n,), tf.float32),
            "kl_coefficient": ((n,), tf.float32),
            "rollout_metrics": ((n, len(ROLLOUT_METRICS)), tf.float32),
        }
        return ({k: tf.TensorSpec(shape, dtype) for k, (shape, dtype) in shapes.items()},)

    def dataset(self):
        """What `fit` iterates: one rollout per step, made no earlier than needed."""
        if keras.config.backend() == "tensorflow":
            import tensorflow as tf

            def batches():
                for _ in range(self.steps_per_epoch):
                    yield (self.fetch(),)

            dataset = tf.data.Dataset.from_generator(batches, output_signature=self.signature())
            dataset = dataset.apply(tf.data.experimental.assert_cardinality(self.steps_per_epoch))
            # No look-ahead: tf.data would otherwise run the generator (and
            # so the rollout) ahead of the train step, with stale weights.
            options = tf.data.Options()
            options.autotune.enabled = False
            options.experimental_optimization.inject_prefetch = False
            options.threading.private_threadpool_size = 1
            return dataset.with_options(options)
        return _RolloutDataset(self)


class _RolloutDataset(keras.utils.PyDataset):
    """One rollout per index; no workers, so nothing is fetched ahead."""

    def __init__(self, rollouts):
        super().__init__(workers=1, use_multiprocessing=False)
        self.rollouts = rollouts

    def __len__(self):
        return self.rollouts.steps_per_epoch

    def __getitem__(self, index):
        return (self.rollouts.fetch(),)


class _RolloutCallback(keras.callbacks.Callback):
    """Makes each step's rollout before the step, where the backend fetches late."""

    def __init__(self, rollouts):
        super().__init__()
        self.rollouts = rollouts

    def on_train_begin(self, logs=None):
        self.rollouts.begin_training()

    def on_train_batch_begin(self, batch, logs=None):
        self.rollouts.prepare()

    def on_train_batch_end(self, batch, logs=None):
        self.rollouts.end_step()

    def on_train_end(self, logs=None):
        self.rollouts.training = False


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaPolicyOptimizer(keras.Model):
    """RLHF of a `GemmaCausalLM` by `fit(prompts)`: RLOO (default) or GRPO.

    `fit(prompts, epochs=..., batch_size=..., callbacks=[...])` runs one
    rollout → score → update per step (see the module docstring for the
    formulas and logged metrics). `batch_size` counts completions, as in
    TRL: `batch_size / num_generations` prompts per step, so it must be a
    multiple of `num_generations`. An epoch visits every prompt once (the
    last batch is filled from the next pass, so shapes never change).

    The policy's weights train (LoRA adapters only, after `enable_lora`);
    the reference is the policy at construction: with LoRA, the same model
    with adapters off; otherwise a frozen copy of the weights (memory: a
    second model). Dropout is off in rollouts, reference passes and updates
    (TRL's `disable_dropout`), so the ratio π/π_old and the KL start at
    exactly 1 and 0.

    Args:
        policy: a `GemmaCausalLM` with a preprocessor.
        reward: a `GemmaRewardModel` (anything with `predict({"prompts",
            "responses"})`) or a callable `reward(prompts, completions)`
            returning one float per completion.
        num_generations: completions per prompt, k >= 2 (TRL's RLOO: 2).
        max_new_tokens: cap on each completion's length.
        temperature: sampling temperature of the rollouts.
        kl_coefficient: β, the weight of the KL toward the reference (TRL's
            RLOO 0.05; GRPO 0.04 in tunix); `AdaptiveKLController` adapts it.
        algorithm: `"rloo"` or `"grpo"`.
        num_updates: optimiser steps per rollout batch; above 1, ratios are
            clipped (PPO-style).
        clip_epsilon: the clip range ε (0.2).
        truncation_penalty: subtracted from the reward of completions with no
            end token (TRL's `missing_eos_penalty`); None for no penalty.
        end_token_ids: `"auto"` (`<eos>` and `<end_of_turn>`) or ids.
        reference: a separate `GemmaCausalLM` (same tokenizer) to measure
            the KL against, used as is; default: the policy as constructed.
        seed: seeds sampling and the prompt order; each step's rollout is a
            function of the seed and the optimizer's step count, so a run
            resumed from a backup repeats an uninterrupted one.

    Example:
    >>> import keras
    >>> from keras_gemma import GemmaBackbone, GemmaCausalLM
    >>> from keras_gemma import GemmaCausalLMPreprocessor, GemmaTokenizer
    >>> from keras_gemma.tokenizer import train_sentencepiece
    >>> tokenizer = GemmaTokenizer(train_sentencepiece(["a b c"] * 50, 268))
    >>> backbone = GemmaBackbone(vocabulary_size=tokenizer.vocabulary_size(),
    ...     num_layers=1, num_query_heads=2, num_key_value_heads=1,
    ...     hidden_dim=8, intermediate_dim=16, head_dim=4)
    >>> lm = GemmaCausalLM(backbone, GemmaCausalLMPreprocessor(tokenizer, 16))
    >>> def reward(prompts, completions):
    ...     return [text.count("a") for text in completions]
    >>> trainer = GemmaPolicyOptimizer(lm, reward, num_generations=2,
    ...     max_new_tokens=4, seed=0)
    >>> trainer.compile(optimizer=keras.optimizers.SGD(0.1))
    >>> history = trainer.fit(["a", "b"], batch_size=4, verbose=0)
    >>> [name in history.history for name in ("reward", "kl", "frac_reward_zero_std")]
    [True, True, True]
    """

    def __init__(
        self,
        policy,
        reward,
        num_generations=2,
        max_new_tokens=64,
        temperature=1.0,
        kl_coefficient=0.05,
        algorithm="rloo",
        num_updates=1,
        clip_epsilon=0.2,
        truncation_penalty=None,
        end_token_ids="auto",
        reference=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if getattr(policy, "preprocessor", None) is None:
            raise ValueError(
                "The policy needs a preprocessor: prompts are text and completions are "
                "decoded for the reward. Build it as GemmaCausalLM(backbone, preprocessor)."
            )
        if algorithm not in ALGORITHMS:
            raise ValueError(f"`algorithm` must be one of {ALGORITHMS}. Received: {algorithm!r}")
        _check_group_size(num_generations, 2, f"algorithm={algorithm!r}")
        for name, value in (("max_new_tokens", max_new_tokens), ("num_updates", num_updates)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer. Received: {value!r}")
        if kl_coefficient < 0 or not 0 < clip_epsilon < 1:
            raise ValueError(
                "`kl_coefficient` must be >= 0 and `clip_epsilon` in (0, 1). Received: "
                f"{kl_coefficient!r}, {clip_epsilon!r}"
            )
        self.policy = policy
        self.num_generations = num_generations
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.kl_coefficient = float(kl_coefficient)
        self.algorithm = algorithm
        self.num_updates = num_updates
        self.clip_epsilon = clip_epsilon
        self.truncation_penalty = truncation_penalty
        # Unseeded, the seed comes from NumPy's global state, so
        # `keras.utils.set_random_seed` still reproduces a run.
        self.seed = int(np.random.randint(2**31 - 1)) if seed is None else int(seed)
        self.end_token_ids = policy.resolve_stop_token_ids(end_token_ids)
        if not self.end_token_ids:
            raise ValueError("`end_token_ids` must name at least one token that ends a completion.")
        self.sampler = samplers.RandomSampler(temperature=temperature, seed=self.seed)
        self.reward_function = _Reward(reward, policy)
        # Plain attributes of plain objects: neither is trained or tracked.
        if reference is None:
            self.reference = ReferencePolicy(policy)
        else:
            check_same_tokenizer(reference, policy, ("reference", "policy"))
            self.reference = ReferencePolicy(reference, as_is=True)
        self._metric_trackers = [keras.metrics.Mean(name=name) for name in ROLLOUT_METRICS]
        self._clip_ratio = keras.metrics.Mean(name="clip_ratio")
        self.last_rollout = None  # texts and rewards of the latest rollout

    # Rollout and scoring (NumPy, outside the compiled step).

    def rollout(self, prompts, width=None):
        """One rollout batch for `prompts` (each sampled `num_generations`
        times): the inputs of `compute_loss`, as NumPy arrays.

        Also sets `last_rollout` to the prompts, completions and rewards.
        """
        policy, k = self.policy, self.num_generations
        prompts = _check_prompts(prompts)
        if width is None:
            lengths = [len(ids) for ids in policy.preprocessor.tokenizer.tokenize(prompts)]
            width = max(lengths) + int(policy.preprocessor.add_start_token) + self.max_new_tokens
        batch = policy.preprocessor.generate_preprocess(prompts, sequence_length=width)
        # k samples per prompt in consecutive rows; the generation engine
        # prefills each prompt once and continues it k times.
        with self._sampling():
            token_ids, prompt_lengths, _ = policy.generator.generate(
                batch["token_ids"], batch["padding_mask"], self.end_token_ids, num_samples=k
            )
        token_ids = np.asarray(token_ids, "int32")
        prompt_mask = np.repeat(batch["padding_mask"], k, axis=0)
        mask, truncated = completion_mask(
            token_ids, prompt_lengths, self.end_token_ids, self.max_new_tokens
        )
        padding_mask = (prompt_mask.astype(bool) | mask.astype(bool)).astype("int32")
        # Padding after a completion: what was sampled past its end is not
        # part of the sequence.
        token_ids = np.where(
            padding_mask.astype(bool), token_ids, policy.preprocessor.tokenizer.pad_token_id
        )
        completions = policy.preprocessor.generate_postprocess(
            {"token_ids": token_ids, "padding_mask": padding_mask},
            skip_tokens=self.end_token_ids,
            strip_lengths=prompt_lengths,
        )
        repeated_prompts = [p for p in prompts for _ in range(k)]
        rewards = self.reward_function(repeated_prompts, completions, token_ids, padding_mask)
        old_log_probs, entropy = score_completions(policy, token_ids, padding_mask, mask)
        reference_log_probs = self.reference.log_probs(token_ids, padding_mask, mask)
        sequence_kl = (old_log_probs - reference_log_probs).sum(axis=1)
        scores = rewards
        if self.truncation_penalty:
            scores = penalize_truncated(scores, truncated, self.truncation_penalty)
        if self.algorithm == "rloo":
            advantages = leave_one_out_advantages(scores - self.kl_coefficient * sequence_kl, k)
        else:
            advantages = group_normalized_advantages(scores, k)
        self.last_rollout = {
            "prompts": repeated_prompts,
            "completions": completions,
            "rewards": rewards,
            "advantages": advantages,
            "truncated": truncated,
        }
        groups = rewards.reshape(-1, k)
        lengths = mask.sum(axis=1)
        if truncated.all():
            warnings.warn(
                f"Every completion of this batch reached max_new_tokens={self.max_new_tokens} "
                "without an end token: raise `max_new_tokens` or check `end_token_ids`.",
                stacklevel=2,
            )
        statistics = {
            "reward": rewards.mean(),
            "reward_std": groups.std(axis=1, ddof=1).mean(),
            "kl": sequence_kl.mean(),
            "entropy": entropy.sum() / max(lengths.sum(), 1),
            "completions/mean_length": lengths.mean(),
            "completions/clipped_ratio": truncated.mean(),
            "frac_reward_zero_std": np.mean(np.ptp(groups, axis=1) == 0),
            "kl_coefficient": self.kl_coefficient,
        }
        n = len(token_ids)
        row = np.array([statistics[name] for name in ROLLOUT_METRICS], "float32")
        return {
            "token_ids": token_ids,
            "padding_mask": padding_mask,
            "completion_mask": mask,
            "old_log_probs": old_log_probs,
            "reference_log_probs": reference_log_probs,
            "advantages": advantages.astype("float32"),
            "kl_coefficient": np.full((n,), self.kl_coefficient, "float32"),
            "rollout_metrics": np.tile(row, (n, 1)),
        }

    # The update.

    def call(self, inputs, training=None):
        """Per-token log-probabilities of the rollout's completions under the
        current policy, `[batch, length - 1]` (dropout off)."""
        per_token, _ = completion_log_probs(
            self.policy, inputs["token_ids"], inputs["padding_mask"], inputs["completion_mask"]
        )
        return per_token

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The policy-gradient loss of a rollout batch `x` (see the module docstring)."""
        log_probs = y_pred
        mask = ops.cast(x["completion_mask"][:, 1:], "float32")
        advantages = ops.cast(x["advantages"], "float32")[:, None]
        if self.num_updates == 1:
            # One update per rollout: π_old is π itself, exactly.
            old = ops.stop_gradient(log_probs)
        else:
            old = ops.cast(x["old_log_probs"], "float32")
        log_ratio = ops.clip(log_probs - old, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        ratio = ops.exp(log_ratio)
        low, high = 1.0 - self.clip_epsilon, 1.0 + self.clip_epsilon
        surrogate = ops.minimum(ratio * advantages, ops.clip(ratio, low, high) * advantages)
        count = ops.maximum(ops.sum(mask, axis=1), 1.0)  # completion tokens per row
        if self.algorithm == "rloo":
            per_row = -ops.sum(surrogate * mask, axis=1)  # sequence-level, as RLOO
        else:
            beta = ops.cast(x["kl_coefficient"], "float32")[:, None]
            reference_gap = ops.clip(
                ops.cast(x["reference_log_probs"], "float32") - log_probs,
                -_MAX_LOG_RATIO,
                _MAX_LOG_RATIO,
            )
            k3 = ops.exp(reference_gap) - reference_gap - 1.0
            per_row = -ops.sum((surrogate - beta * k3) * mask, axis=1) / count
        clipped = ops.logical_or(
            ops.logical_and(ratio < low, advantages < 0),
            ops.logical_and(ratio > high, advantages > 0),
        )
        clipped = ops.sum(ops.cast(clipped, "float32") * mask) / ops.maximum(ops.sum(mask), 1.0)
        self._clip_ratio.update_state(clipped)
        statistics = ops.cast(x["rollout_metrics"][0], "float32")
        for i, tracker in enumerate(self._metric_trackers):
            tracker.update_state(statistics[i])
        return ops.mean(per_row)

    # Training.

    def compile(self, optimizer="auto", **kwargs):
        """`keras.Model.compile`; `"auto"` is Adam at 1e-6 on full weights
        and 1e-5 with LoRA (small steps: a policy drifts quickly)."""
        if optimizer == "auto":
            lora = self.reference.uses_adapters
            optimizer = keras.optimizers.Adam(learning_rate=1e-5 if lora else 1e-6)
        if kwargs.get("loss") is not None:
            raise ValueError("GemmaPolicyOptimizer computes its own loss; don't pass `loss`.")
        super().compile(optimizer=optimizer, **kwargs)

    def fit(
        self, x=None, y=None, batch_size=None, epochs=1, callbacks=None, shuffle=True, **kwargs
    ):
        """Optimises the policy on prompts `x` (a list of strings).

        Args:
            x: the prompts.
            batch_size: completions per step, a multiple of `num_generations`
                (default: `num_generations` × min(8, number of prompts)).
            epochs: passes over the prompts.
            callbacks: Keras callbacks; they see the metrics above.
            shuffle: shuffle the prompts each pass.
            **kwargs: other `keras.Model.fit` arguments (`verbose`,
                `initial_epoch`, `steps_per_epoch`: steps per epoch when an
                epoch should not be one pass over the prompts).

        Returns:
            A `keras.callbacks.History`.
        """
        if y is not None or kwargs.get("sample_weight") is not None:
            raise ValueError("`fit` takes prompts only: the rewards come from `reward`.")
        if kwargs.get("validation_data") is not None or kwargs.get("validation_split"):
            raise ValueError(
                "Validation data is not supported; evaluate the policy with a callback "
                "(e.g. `GenerateSamples`) or after `fit`."
            )
        prompts = _check_prompts(x)
        k = self.num_generations
        if batch_size is None:
            batch_size = k * min(8, len(prompts))
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < k:
            raise ValueError(
                f"`batch_size` counts completions and must be a positive multiple of "
                f"num_generations={k}. Received: {batch_size!r}"
            )
        if batch_size % k:
            raise ValueError(
                f"`batch_size`={batch_size} is not a multiple of num_generations={k}: each "
                f"prompt's {k} completions must share a batch (their advantages are relative "
                f"to each other). Use batch_size={batch_size - batch_size % k} or "
                f"{batch_size + k - batch_size % k}."
            )
        if not self.compiled:
            self.compile()
        rollouts = _Rollouts(
            self, prompts, batch_size // k, shuffle, kwargs.pop("steps_per_epoch", None)
        )
        callbacks = [_RolloutCallback(rollouts), *(callbacks or [])]
        with self._sampling():
            return super().fit(
                rollouts.dataset(), epochs=epochs, callbacks=callbacks, shuffle=False, **kwargs
            )

    @contextlib.contextmanager
    def _sampling(self):
        """The policy samples with this trainer's sampler within the block (all
        of `fit`), and its own one afterwards. Its compiled generation loops are
        cached by shape, not by sampler, so they are dropped on both changes."""
        policy = self.policy
        if policy.sampler is self.sampler:
            yield
            return
        saved = policy.sampler
        policy.sampler = self.sampler
        policy.generator.clear()
        try:
            yield
        finally:
            policy.sampler = saved
            policy.generator.clear()

    def get_config(self):
        raise NotImplementedError(
            "Save the trained policy (`trainer.policy.save_to_preset(...)` or "
            "`backbone.save_lora_weights(...)`), not the optimiser wrapper."
        )


def _check_prompts(prompts):
    if prompts is None:
        raise ValueError("`fit` needs prompts: a non-empty list of strings.")
    if isinstance(prompts, (list, tuple, np.ndarray)) and len(prompts) == 0:
        raise ValueError("The prompts are empty: pass at least one prompt string.")
    prompts, _ = as_string_list(prompts, "The prompts")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise ValueError(
            f"Prompts {empty[:10]} are empty or whitespace only; every prompt needs text "
            "to condition on."
        )
    return prompts
