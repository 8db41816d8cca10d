"""Policy optimisation (RLOO, GRPO) driven by `fit`, on every backend."""

import csv

import keras
import numpy as np
import pytest
from conftest import make_backbone
from helpers import assert_close
from helpers import to_numpy
from helpers import value_and_gradients
from keras import ops

from keras_gemma import GemmaCausalLM
from keras_gemma import GemmaCausalLMPreprocessor
from keras_gemma import RandomSampler
from keras_gemma.alignment.policy import completion_log_probs
from keras_gemma.alignment.rloo import ROLLOUT_METRICS
from keras_gemma.alignment.rloo import GemmaPolicyOptimizer
from keras_gemma.alignment.rloo import group_normalized_advantages
from keras_gemma.alignment.rloo import leave_one_out_advantages

PROMPTS = ["The quick", "A journey", "What is", "Keras runs", "She sells", "To be", "Peter", "All"]


def space_reward(prompts, completions):
    """A simple programmatic reward: the fraction of spaces in the completion."""
    return [c.count(" ") / max(len(c), 1) for c in completions]


def _lm(tokenizer, seed=0):
    return GemmaCausalLM(make_backbone("mqa", seed=seed), GemmaCausalLMPreprocessor(tokenizer, 32))


def _trainer(tokenizer, reward=space_reward, **kwargs):
    kwargs = {"num_generations": 2, "max_new_tokens": 5, "seed": 0, **kwargs}
    return GemmaPolicyOptimizer(_lm(tokenizer), reward, **kwargs)


def test_advantages():
    rewards = np.array([1.0, 2.0, 6.0, 0.5, 0.5, 0.5], "float32")
    loo = leave_one_out_advantages(rewards, 3)
    assert_close(loo.reshape(2, 3).sum(axis=1), [0.0, 0.0], atol=1e-6)
    assert_close(loo[:3], [1.0 - 4.0, 2.0 - 3.5, 6.0 - 1.5], atol=1e-6)
    assert_close(loo[3:], [0.0] * 3)
    grpo = group_normalized_advantages(rewards, 3)
    assert_close(grpo[:3], (rewards[:3] - 3.0) / (rewards[:3].std(ddof=1) + 1e-4), atol=1e-5)
    assert_close(grpo[3:], [0.0] * 3)
    with pytest.raises(ValueError, match="num_generations.*>= 2"):
        leave_one_out_advantages(rewards, 1)


def test_policy_equal_to_reference_has_zero_kl_and_the_reinforce_gradient(tokenizer):
    trainer = _trainer(tokenizer, kl_coefficient=0.5, num_generations=3)
    batch = trainer.rollout(PROMPTS[:2])
    assert batch["token_ids"].shape[0] == 6
    assert_close(batch["reference_log_probs"], batch["old_log_probs"], atol=1e-5)
    assert abs(batch["rollout_metrics"][0, ROLLOUT_METRICS.index("kl")]) < 1e-4
    # So the KL term is 0 and the advantages are the rewards' leave-one-out.
    rewards = trainer.last_rollout["rewards"]
    assert_close(batch["advantages"], leave_one_out_advantages(rewards, 3), atol=1e-4)
    policy = trainer.policy
    variables = policy.trainable_variables
    inputs = {k: ops.convert_to_tensor(v) for k, v in batch.items()}

    def rloo_loss():
        return trainer.compute_loss(inputs, y_pred=trainer(inputs))

    def reinforce_loss():
        _, total = completion_log_probs(
            policy, inputs["token_ids"], inputs["padding_mask"], inputs["completion_mask"]
        )
        return -ops.mean(inputs["advantages"] * total)

    value, grads = value_and_gradients(rloo_loss, variables)
    expected_value, expected = value_and_gradients(reinforce_loss, variables)
    assert_close(value, -batch["advantages"].mean(), atol=1e-5)  # ratio 1: -mean(A)
    assert sum(float(np.abs(g).sum()) for g in expected) > 0
    for g, e in zip(grads, expected):
        assert_close(g, e, atol=1e-5)


def test_one_step_raises_positively_and_lowers_negatively_rewarded_completions(tokenizer):
    trainer = _trainer(tokenizer, num_generations=2, max_new_tokens=4)
    trainer.compile(optimizer=keras.optimizers.SGD(0.05))
    batch = trainer.rollout(PROMPTS[:2])
    batch["advantages"] = np.array([1.0, -1.0, 0.0, 0.0], "float32")

    def sequence_log_probs():
        _, total = completion_log_probs(
            trainer.policy, batch["token_ids"], batch["padding_mask"], batch["completion_mask"]
        )
        return to_numpy(total)

    before = sequence_log_probs()
    trainer.train_on_batch(batch)
    after = sequence_log_probs()
    assert after[0] > before[0] + 1e-3
    assert after[1] < before[1] - 1e-3


def test_fit_raises_a_programmatic_reward_with_current_weights_and_logs(tokenizer, tmp_path):
    lm = _lm(tokenizer)
    seen = []  # the policy's weights when each rollout is rewarded

    def reward(prompts, completions):
        seen.append(float(np.abs(to_numpy(lm.backbone.token_embedding.embeddings)).sum()))
        return space_reward(prompts, completions)

    trainer = GemmaPolicyOptimizer(
        lm, reward, num_generations=4, max_new_tokens=6, kl_coefficient=0.001, seed=0
    )
    trainer.compile(optimizer=keras.optimizers.Adam(0.03))
    trainer.rollout(PROMPTS * 2)
    before = trainer.last_rollout["rewards"].mean()
    seen.clear()
    log = tmp_path / "log.csv"
    history = trainer.fit(
        PROMPTS, batch_size=32, epochs=8, verbose=0, callbacks=[keras.callbacks.CSVLogger(log)]
    )
    for name in (*ROLLOUT_METRICS, "clip_ratio", "loss"):
        assert len(history.history[name]) == 8, name
    with open(log) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and float(rows[-1]["completions/mean_length"]) > 0
    rewards = history.history["reward"]
    assert np.mean(rewards[-2:]) > np.mean(rewards[:2]) + 0.05
    after = trainer.rollout(PROMPTS * 2)
    assert trainer.last_rollout["rewards"].mean() > before + 0.05
    assert max(history.history["kl"]) > 0
    # Each rollout saw the weights after every earlier update: one rollout a
    # step (the build may peek at the first), each with different weights.
    steps = seen[-8:]
    assert len(seen) in (8, 9) and len(set(steps)) == 8
    assert after["token_ids"].shape[0] == 64


def test_a_fit_split_in_two_repeats_an_uninterrupted_one(tokenizer):
    """Rollouts are addressed by the optimizer's step, so fitting epoch 0, then
    epoch 1 with `initial_epoch=1` (as a resumed recipe does), samples the same
    completions and ends on the same weights as one fit of both epochs."""

    def run(splits):
        trainer = _trainer(tokenizer, num_generations=2, max_new_tokens=4, seed=3)
        trainer.compile(optimizer=keras.optimizers.SGD(0.5))
        completions = []

        def record(*_, **__):
            completions.append(trainer.last_rollout["completions"])

        callback = keras.callbacks.LambdaCallback(on_train_batch_end=record)
        for initial_epoch, epochs in splits:
            trainer.fit(
                PROMPTS[:3], batch_size=4, epochs=epochs, initial_epoch=initial_epoch,
                steps_per_epoch=2, verbose=0, callbacks=[callback],
            )  # fmt: skip
        return completions, [to_numpy(v) for v in trainer.policy.trainable_variables]

    whole, whole_weights = run([(0, 2)])
    split, split_weights = run([(0, 1), (1, 2)])
    assert len(whole) == 4 and split == whole
    # Different steps sampled different prompts or completions.
    assert len({tuple(c) for c in whole}) == 4
    for a, b in zip(whole_weights, split_weights):
        assert_close(a, b, atol=1e-6)


def test_grpo_with_several_updates_per_rollout_clips_ratios(tokenizer):
    trainer = _trainer(tokenizer, algorithm="grpo", num_updates=2, num_generations=2)
    trainer.compile(optimizer=keras.optimizers.SGD(2.0))
    calls = []

    def count(prompts, completions):
        calls.append(len(completions))
        return space_reward(prompts, completions)

    trainer.reward_function.function = count
    history = trainer.fit(PROMPTS[:2], batch_size=4, epochs=2, verbose=0)
    # 2 steps per epoch, one rollout for both; the build may peek once more.
    assert len(calls) in (2, 3)
    assert all(np.isfinite(v).all() for v in history.history.values())
    assert 0.0 <= history.history["clip_ratio"][-1] <= 1.0


def test_bad_input_gets_clear_errors(tokenizer):
    with pytest.raises(ValueError, match=r"num_generations.*>= 2"):
        _trainer(tokenizer, num_generations=1)
    with pytest.raises(ValueError, match="preprocessor"):
        GemmaPolicyOptimizer(GemmaCausalLM(make_backbone()), space_reward)
    with pytest.raises(TypeError, match="callable"):
        _trainer(tokenizer, reward=3)
    trainer = _trainer(tokenizer)
    with pytest.raises(ValueError, match="empty"):
        trainer.fit([])
    with pytest.raises(ValueError, match="empty"):
        trainer.fit(["ok", "  "])
    with pytest.raises(ValueError, match="multiple of num_generations=2"):
        trainer.fit(PROMPTS, batch_size=5)
    trainer.reward_function.function = lambda p, c: [1.0]
    with pytest.raises(ValueError, match="returned 1 values for 4 completions"):
        trainer.rollout(PROMPTS[:2])
    trainer.reward_function.function = lambda p, c: [1.0, float("nan"), 0.0, 0.0]
    with pytest.raises(ValueError, match="NaN"):
        trainer.rollout(PROMPTS[:2])


def test_reward_model_objects_are_called_through_predict(tokenizer):
    class Scorer:
        def predict(self, x, verbose=0):
            return np.array([len(r) for r in x["responses"]], "float32")

    trainer = _trainer(tokenizer, reward=Scorer())
    trainer.rollout(PROMPTS[:1])
    rollout = trainer.last_rollout
    assert_close(rollout["rewards"], [len(c) for c in rollout["completions"]])


def test_one_prefill_per_prompt_equals_repeating_each_prompt(tokenizer):
    lm = _lm(tokenizer)
    batch = lm.preprocessor.generate_preprocess(["The quick brown", "A"], sequence_length=14)
    ids, mask = batch["token_ids"], batch["padding_mask"]
    for sampler in ("greedy", "random"):
        outputs = []
        for shared in (True, False):
            lm.compile(sampler=RandomSampler(seed=3) if sampler == "random" else sampler)
            if shared:
                outputs.append(lm.generator.generate(ids, mask, (), num_samples=3))
            else:
                repeated = np.repeat(ids, 3, axis=0), np.repeat(mask, 3, axis=0)
                outputs.append(lm.generator.generate(*repeated, ()))
        (shared_ids, shared_lengths, _), (repeated_ids, repeated_lengths, _) = outputs
        np.testing.assert_array_equal(shared_lengths, repeated_lengths)
        np.testing.assert_array_equal(shared_ids, repeated_ids)
        if sampler == "random":  # the samples of one prompt differ
            assert len({tuple(row) for row in shared_ids[:3]}) > 1
