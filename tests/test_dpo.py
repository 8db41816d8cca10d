"""GemmaDPO: the loss against a hand computation, step 0, a short fit, the reference."""

import json
import sys

import keras
import numpy as np
import pytest
from conftest import make_backbone
from helpers import assert_close
from helpers import to_numpy
from test_reward_model import TRAINING
from test_reward_model import recipe_argv
from test_reward_model import write_recipe_inputs

from keras_gemma import GemmaCausalLM
from keras_gemma import GemmaCausalLMPreprocessor
from keras_gemma.alignment.dpo import GemmaDPO

sys.path.insert(0, str(TRAINING))

import dpo as recipe  # noqa: E402  (training/dpo.py)

PAIRS = {
    "prompts": [
        "What is 12 plus 30?",
        "What color is a banana?",
        "Translate cat to French.",
        "Who flew to the Moon?",
    ],
    "chosen": ["42.", "A banana is yellow.", "chat", "3 astronauts."],
    "rejected": ["12.", "A banana is blue.", "dog", "A fox."],
}


def _policy(tokenizer, lora_rank=None):
    lm = GemmaCausalLM(make_backbone("mqa", seed=0), GemmaCausalLMPreprocessor(tokenizer, 32))
    if lora_rank:
        lm.backbone.enable_lora(lora_rank)
    return lm


def _sequence_log_probs(lm, token_ids, completion_mask):
    """log π(completion | prompt) from the full logits, in float64 NumPy."""
    logits = to_numpy(lm({"token_ids": token_ids, "padding_mask": token_ids != 0})).astype("f8")
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = np.take_along_axis(log_probs[:, :-1], token_ids[:, 1:, None], -1)[..., 0]
    return (targets * completion_mask[:, 1:]).sum(axis=1)


def test_loss_equals_a_hand_computation_and_is_log_2_at_step_0(tokenizer):
    lm = _policy(tokenizer)
    dpo = GemmaDPO(lm, beta=0.3)
    batch = dpo.preprocess(PAIRS)
    # The completion is the response and its <eos>: never the prompt.
    mask, ids = batch["chosen_completion_mask"], batch["chosen_token_ids"]
    completion = ids[0][mask[0] == 1].tolist()
    assert completion[-1] == tokenizer.end_token_id
    assert tokenizer.detokenize(completion[:-1]) == "42."
    outputs = to_numpy(dpo(batch))  # [pairs, (π_c, π_r, ref_c, ref_r)]
    policy_chosen = _sequence_log_probs(lm, ids, mask)
    policy_rejected = _sequence_log_probs(
        lm, batch["rejected_token_ids"], batch["rejected_completion_mask"]
    )
    assert_close(outputs[:, 0], policy_chosen, atol=1e-4)
    assert_close(outputs[:, 1], policy_rejected, atol=1e-4)
    # Step 0: the reference is the policy, so every logit is 0 and the loss log 2.
    assert_close(outputs[:, 2:], outputs[:, :2], atol=1e-4)
    loss = to_numpy(dpo.compute_loss(batch, None, outputs))
    assert_close(loss, np.log(2.0), atol=1e-6)
    # Against made-up reference log-probabilities, DPO's formula by hand.
    reference_chosen = policy_chosen + np.array([0.5, -1.0, 2.0, 0.0])
    reference_rejected = policy_rejected + np.array([-0.5, 1.0, 0.0, 3.0])
    predicted = np.stack(
        [policy_chosen, policy_rejected, reference_chosen, reference_rejected], axis=1
    ).astype("float32")
    dpo.reset_metrics()
    loss = to_numpy(dpo.compute_loss(batch, None, predicted))
    z = 0.3 * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    assert_close(loss, np.mean(np.log1p(np.exp(-z))), atol=1e-5)
    # Accuracy: pairs whose implicit chosen reward is higher (z > 0).
    accuracy = {m.name: m.result() for m in dpo.metrics}["rewards/accuracies"]
    assert_close(accuracy, np.mean(z > 0), atol=1e-6)


def test_short_fit_with_lora_raises_the_margin_and_keeps_the_reference(tokenizer):
    lm = _policy(tokenizer, lora_rank=4)
    dpo = GemmaDPO(lm, beta=0.1)
    assert dpo.reference_model is None  # adapters off: no copy of the weights
    batch = dpo.preprocess(PAIRS)
    before = to_numpy(dpo(batch))
    dpo.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = dpo.fit(PAIRS, batch_size=4, epochs=4, verbose=0).history
    assert history["loss"][0] == pytest.approx(np.log(2.0), abs=1e-5)
    # Defined at step 0, where every implicit reward is 0 up to rounding (TRL
    # counts exact ties as wrong; rounding in the two passes may break them).
    assert 0.0 <= history["rewards/accuracies"][0] <= 1.0
    assert history["loss"][-1] < history["loss"][0]
    assert history["rewards/margins"][-1] > 0
    after = to_numpy(dpo(batch))
    assert np.mean(after[:, 0] - after[:, 1]) > np.mean(before[:, 0] - before[:, 1])
    # The reference (adapters off) is still the starting policy.
    assert_close(after[:, 2:], before[:, :2], atol=1e-4)


def test_precomputed_reference_needs_no_copy(tokenizer):
    lm = _policy(tokenizer)
    dpo = GemmaDPO(lm, reference=None)
    with pytest.raises(ValueError, match="precompute_reference_log_probs"):
        dpo.fit(PAIRS, verbose=0)
    data = dpo.precompute_reference_log_probs(PAIRS, batch_size=2)
    outputs = to_numpy(dpo(dpo.preprocess(data)))  # the policy's, then the columns
    assert_close(outputs[:, 2:], outputs[:, :2], atol=1e-4)
    dpo.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = dpo.fit(data, batch_size=4, epochs=2, verbose=0).history
    assert history["loss"][0] == pytest.approx(np.log(2.0), abs=1e-4)
    assert history["loss"][1] < history["loss"][0]


def test_bad_input_names_the_fix(tokenizer):
    lm = _policy(tokenizer)
    with pytest.raises(ValueError, match="preprocessor"):
        GemmaDPO(GemmaCausalLM(make_backbone()))
    with pytest.raises(ValueError, match="beta"):
        GemmaDPO(lm, beta=0.0)
    dpo = GemmaDPO(lm, reference=None)
    with pytest.raises(ValueError, match="missing"):
        dpo.fit({"prompts": ["q"], "chosen": ["a"]}, verbose=0)
    with pytest.raises(ValueError, match="but not its partner"):
        dpo.fit({**PAIRS, "reference_chosen_logps": [0.0] * 4}, verbose=0)
    with pytest.raises(ValueError, match="Unknown preference data keys"):
        dpo.fit({**PAIRS, "margin": [0.0] * 4}, verbose=0)


@pytest.mark.slow(reason="a short recipe run")
def test_recipe_trains_and_saves_the_policy(tokenizer, tmp_path):
    preset, data = write_recipe_inputs(tokenizer, tmp_path)
    # One straight run: resuming is the reward-model recipe's test (same helpers).
    argv = recipe_argv(preset, data, tmp_path / "dpo") + ["--reference", "precompute"]
    saved = recipe.main(argv)
    log = (tmp_path / "dpo" / "log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in log[1:]] == ["0", "1"]
    assert "rewards/accuracies" in log[0]
    validation = json.loads((tmp_path / "dpo" / "validation.json").read_text())
    assert np.isfinite(validation["loss"])
    assert (tmp_path / "dpo" / "adapter.lora.safetensors").is_file()
    assert GemmaCausalLM.from_preset(saved).backbone.num_layers == 2
    with pytest.raises(SystemExit):
        recipe.parse_args(["--help"])
