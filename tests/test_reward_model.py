"""GemmaRewardModel: Bradley–Terry training, where the reward is read, presets, bad input."""

import json
import pathlib
import sys

import keras
import numpy as np
import pytest
from conftest import make_backbone
from helpers import assert_close
from helpers import to_numpy

from keras_gemma import GemmaCausalLM
from keras_gemma import GemmaCausalLMPreprocessor
from keras_gemma import GemmaTokenizer
from keras_gemma.alignment.preferences import check_preferences
from keras_gemma.alignment.reward_model import GemmaRewardModel
from keras_gemma.alignment.reward_model import check_same_tokenizer
from keras_gemma.tokenizer import train_sentencepiece

TRAINING = pathlib.Path(__file__).resolve().parents[1] / "training"
sys.path.insert(0, str(TRAINING))

import reward_model as recipe  # noqa: E402  (training/reward_model.py)

# Separable: the chosen answer is always right, the rejected one wrong.
PAIRS = {
    "prompts": [
        "What is 12 plus 30?",
        "What color is a banana?",
        "Who flew to the Moon?",
        "Translate cat to French.",
    ],
    "chosen": ["42.", "A banana is yellow.", "3 astronauts.", "chat"],
    "rejected": ["12.", "A banana is blue.", "A fox.", "dog"],
}


def _model(tokenizer, sequence_length=32, **kwargs):
    backbone = make_backbone("mqa", seed=0)
    return GemmaRewardModel(
        backbone, GemmaCausalLMPreprocessor(tokenizer, sequence_length), **kwargs
    )


def test_loss_falls_and_accuracy_reaches_one_on_separable_pairs(tokenizer):
    model = _model(tokenizer)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    history = model.fit(PAIRS, batch_size=4, epochs=12, verbose=0).history
    assert history["loss"][-1] < 0.5 * history["loss"][0], history["loss"]
    assert history["accuracy"][-1] == 1.0
    assert history["margin"][-1] > history["margin"][0]


def test_bradley_terry_loss_equals_a_hand_computation(tokenizer):
    model = _model(tokenizer, center_rewards_coefficient=0.01)
    batch = model.preprocess({**PAIRS, "margin": [0.0, 0.5, -1.0, 2.0]})
    outputs = model(batch)
    rewards = to_numpy(outputs)  # [pairs, (chosen, rejected)]
    loss = to_numpy(model.compute_loss(batch, None, outputs))
    chosen, rejected = rewards[:, 0].astype("float64"), rewards[:, 1].astype("float64")
    z = chosen - rejected - np.array([0.0, 0.5, -1.0, 2.0])
    expected = np.mean(np.log1p(np.exp(-z))) + 0.01 * np.mean((chosen + rejected) ** 2)
    assert_close(loss, expected, atol=1e-6)
    # The rewards are the head on the hidden state of each row's last token (<eos>).
    ids = np.concatenate([batch["chosen_token_ids"], batch["rejected_token_ids"]])
    mask = np.concatenate([batch["chosen_padding_mask"], batch["rejected_padding_mask"]])
    last = mask.sum(axis=1) - 1
    assert (ids[np.arange(len(ids)), last] == tokenizer.end_token_id).all()
    hidden = to_numpy(model.backbone({"token_ids": ids, "padding_mask": mask}))
    kernel = to_numpy(model.reward_head.kernel)[:, 0]
    by_hand = hidden[np.arange(len(ids)), last] @ kernel
    assert_close(rewards.T.reshape(-1), by_hand, atol=1e-5)


def test_reward_is_read_at_the_last_real_token_whatever_the_padding(tokenizer):
    model = _model(tokenizer)
    model.reward_head.kernel.assign(np.random.default_rng(0).normal(size=(32, 1)))
    short = {"prompts": ["Hi"], "responses": ["A fox."]}
    long = {
        "prompts": ["Hi", "What is 12 plus 30? Answer in full."],
        "responses": ["A fox.", "12 plus 30 is 42, the answer."],
    }
    # The short row alone with little padding, then beside a longer row
    # with much more: the same reward.
    alone = model.preprocess_responses(short, sequence_length=12)
    batched = model.preprocess_responses(long, sequence_length=40)
    np.testing.assert_array_equal(batched["token_ids"][0, :12], alone["token_ids"][0])
    alone = to_numpy(model.compute_rewards(alone["token_ids"], alone["padding_mask"]))
    batched = to_numpy(model.compute_rewards(batched["token_ids"], batched["padding_mask"]))
    assert_close(batched[0], alone[0], atol=1e-5)
    assert abs(batched[0] - batched[1]) > 1e-3


def test_predict_returns_one_float_per_row(tokenizer):
    model = _model(tokenizer)
    rewards = model.predict({"prompts": PAIRS["prompts"], "responses": PAIRS["chosen"]}, verbose=0)
    assert rewards.shape == (4,) and rewards.dtype == np.float32
    # Generated rows (no <eos>; one filling its row) get it appended, as in training.
    tokens = model.preprocess_responses({"prompts": PAIRS["prompts"], "responses": PAIRS["chosen"]})
    ids, mask = tokens["token_ids"].copy(), tokens["padding_mask"].copy()
    last = mask.sum(axis=1) - 1
    ids[np.arange(4), last], mask[np.arange(4), last] = 0, 0
    assert_close(model.score_tokens(ids, mask), rewards, atol=1e-5)
    full = ids[:1, : last[0]]
    assert_close(model.score_tokens(full, np.ones_like(full)), rewards[:1], atol=1e-5)
    conversations = [
        [{"role": "user", "content": p}, {"role": "model", "content": c}]
        for p, c in zip(PAIRS["prompts"], PAIRS["chosen"])
    ]
    assert model.predict({"messages": conversations}, verbose=0).shape == (4,)


def test_predict_names_the_accepted_inputs(tokenizer):
    model = _model(tokenizer)
    with pytest.raises(ValueError, match=r"\{'prompts', 'responses'\}.*Received keys \['prompt'"):
        model.predict({"prompt": ["q"], "responses": ["a"]}, verbose=0)
    with pytest.raises(ValueError, match="same length"):
        model.predict({"prompts": ["q", "r"], "responses": ["a"]}, verbose=0)


def test_conversations_end_with_end_of_turn_then_eos(tokenizer):
    def conversation(prompt, reply):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]

    data = {
        side: [conversation(p, r) for p, r in zip(PAIRS["prompts"], PAIRS[side])]
        for side in ("chosen", "rejected")
    }
    model = _model(tokenizer, sequence_length=48)
    batch = model.preprocess(data)
    ids, mask = batch["chosen_token_ids"], batch["chosen_padding_mask"]
    last = mask.sum(axis=1) - 1
    assert (ids[np.arange(4), last] == tokenizer.end_token_id).all()
    assert (ids[np.arange(4), last - 1] == tokenizer.end_of_turn_id).all()
    # Conversations share the rest of the path (fit, predict) with plain text.


def test_preset_round_trip_gives_equal_rewards(tokenizer, tmp_path):
    model = _model(tokenizer)
    model.reward_head.kernel.assign(np.random.default_rng(1).normal(size=(32, 1)))
    responses = {"prompts": PAIRS["prompts"], "responses": PAIRS["rejected"]}
    model.save_to_preset(tmp_path / "rm")
    loaded = GemmaRewardModel.from_preset(tmp_path / "rm")
    assert_close(loaded.predict(responses, verbose=0), model.predict(responses, verbose=0))
    assert loaded.preprocessor.sequence_length == 32
    # Any Gemma preset (here a causal LM's) gives a reward model with a fresh head.
    lm = GemmaCausalLM(make_backbone("mqa", seed=0), GemmaCausalLMPreprocessor(tokenizer, 24))
    lm.save_to_preset(tmp_path / "lm")
    fresh = GemmaRewardModel.from_preset(tmp_path / "lm")
    assert np.abs(to_numpy(fresh.reward_head.kernel)).max() < 0.2
    # With LoRA on, saving asks for the adapters to be merged first.
    model.backbone.enable_lora(2)
    with pytest.raises(ValueError, match="merge_lora"):
        model.save_to_preset(tmp_path / "rm")
    assert (tmp_path / "rm" / "reward_head.safetensors").is_file()  # the old one survives


def test_lora_trains_adapters_and_head_only(tokenizer):
    model = _model(tokenizer)
    model.backbone.enable_lora(2)
    frozen = to_numpy(model.backbone.token_embedding.embeddings).copy()
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    history = model.fit(PAIRS, batch_size=4, epochs=3, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    assert "reward_head/kernel" in {v.path for v in model.trainable_variables}
    np.testing.assert_array_equal(to_numpy(model.backbone.token_embedding.embeddings), frozen)


def test_dropout_is_off_in_fit_and_restored(tokenizer):
    model = GemmaRewardModel(
        make_backbone("mqa", seed=0, dropout=0.5), GemmaCausalLMPreprocessor(tokenizer, 32)
    )
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    history = model.fit(PAIRS, batch_size=4, epochs=2, shuffle=False, verbose=0).history
    # Without dropout two epochs of zero-step training see identical losses.
    assert_close(history["loss"][1], history["loss"][0], atol=1e-6)
    assert model.backbone.transformer_layers[0].residual_dropout.rate == 0.5


@pytest.mark.parametrize(
    "data, error, message",
    [
        (["a", "b"], TypeError, "must be a dict"),
        ({"prompts": ["q"], "chosen": ["a"]}, ValueError, r"missing \['rejected'\]"),
        ({"prompt": ["q"], "chosen": ["a"], "rejected": ["b"]}, ValueError, "'prompts'"),
        ({"prompts": ["q", "r"], "chosen": ["a"], "rejected": ["b"]}, ValueError, "sizes"),
        ({"chosen": ["a", 3], "rejected": ["b", "c"]}, TypeError, "row 1: 'chosen'"),
        ({"chosen": [], "rejected": []}, ValueError, "empty"),
        ({"chosen": "a", "rejected": "b"}, TypeError, "Wrap a single pair"),
        ({"chosen": ["a"], "rejected": ["b"], "margin": [float("nan")]}, ValueError, "finite"),
        (
            {"chosen": [[{"role": "user", "content": "q"}]], "rejected": ["b"]},
            TypeError,
            "one format",
        ),
    ],
)
def test_bad_preference_data_names_the_fix(data, error, message):
    with pytest.raises(error, match=message):
        check_preferences(data)


def test_long_rows_warn_and_keep_their_end_token(tokenizer):
    model = _model(tokenizer, sequence_length=12)
    with pytest.warns(UserWarning, match="truncated"):
        batch = model.preprocess({"prompts": ["word " * 20], "chosen": ["a"], "rejected": ["b"]})
    assert batch["chosen_padding_mask"].sum() == 12
    assert batch["chosen_token_ids"][0, -1] == tokenizer.end_token_id


def test_fit_rejects_bad_input(tokenizer):
    model = _model(tokenizer)
    with pytest.raises(ValueError, match="without `y`"):
        model.fit(PAIRS, np.zeros(4), verbose=0)
    with pytest.raises(ValueError, match="Unknown preference data keys"):
        model.fit({**PAIRS, "reference_chosen_logps": [0.0] * 4}, verbose=0)


def test_different_tokenizers_are_refused(tokenizer, vocab_proto):
    model = _model(tokenizer)
    policy = GemmaCausalLM(make_backbone(), GemmaCausalLMPreprocessor(tokenizer, 8))
    check_same_tokenizer(model, policy)
    other = GemmaTokenizer(train_sentencepiece(["the lazy dog jumps over the fox"] * 50, 300))
    with pytest.raises(ValueError, match="differs from the policy's"):
        check_same_tokenizer(model, other)


# The recipe, training/reward_model.py.


class Interrupt(keras.callbacks.Callback):
    """Raises after `steps` training steps, as a kill would stop a run."""

    def __init__(self, steps):
        super().__init__()
        self.steps, self.seen = steps, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.steps:
            raise KeyboardInterrupt("interrupted for the test")


def write_recipe_inputs(tokenizer, directory):
    """A tiny causal-LM preset and a JSONL file of pairs in both layouts."""
    lm = GemmaCausalLM(make_backbone("mqa", seed=0), GemmaCausalLMPreprocessor(tokenizer, 48))
    lm.save_to_preset(directory / "preset")
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(*PAIRS.values())]
    rows.append({
        "chosen": [{"role": "user", "content": "Hi"}, {"role": "model", "content": "Hello!"}],
        "rejected": [{"role": "user", "content": "Hi"}, {"role": "model", "content": "No."}],
    })  # fmt: skip
    data = directory / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return directory / "preset", data


def recipe_argv(preset, data, output):
    return [
        "--preset", str(preset), "--data", str(data), "--validation-data", str(data),
        "--output", str(output), "--lora-rank", "2", "--steps", "4", "--steps-per-epoch", "2",
        "--batch-size", "4", "--warmup-steps", "1", "--sequence-length", "48",
        "--learning-rate", "1e-2", "--verbose", "0",
    ]  # fmt: skip


@pytest.mark.slow(reason="two short recipe runs")
def test_recipe_resumes_after_a_kill_and_saves_a_reward_model(tokenizer, tmp_path):
    argv = recipe_argv(*write_recipe_inputs(tokenizer, tmp_path), tmp_path / "rm")
    with pytest.raises(KeyboardInterrupt):
        recipe.main(argv, callbacks=[Interrupt(3)])
    assert (tmp_path / "rm" / "backup").exists()
    preset = recipe.main(argv)
    log = (tmp_path / "rm" / "log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in log[1:]] == ["0", "1"]
    assert "accuracy" in log[0] and "margin" in log[0]
    assert 0.0 <= json.loads((tmp_path / "rm" / "validation.json").read_text())["accuracy"] <= 1
    assert not (tmp_path / "rm" / "backup").exists()
    rewards = GemmaRewardModel.from_preset(preset).predict(
        {"prompts": ["Hi"], "responses": ["Hello!"]}, verbose=0
    )
    assert np.isfinite(rewards).all()


def test_recipe_reads_pairs_and_names_bad_lines(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        json.dumps({"prompt": "Q", "chosen": "A", "rejected": "B", "margin": 1}) + "\n"
        + json.dumps({"prompt": "R", "chosen": "C", "rejected": "D", "margin": 0.5}) + "\n"
    )  # fmt: skip
    data = recipe.read_preference_data(path)
    assert data["prompts"][0] == "<start_of_turn>user\nQ<end_of_turn>\n<start_of_turn>model\n"
    assert data["chosen"][0] == "A<end_of_turn>" and data["margin"] == [1.0, 0.5]
    for row, message in [
        ({"prompt": "Q", "chosen": "A"}, "line 1: a preference pair needs"),
        ({"chosen": "A", "rejected": "B"}, "line 1: plain-text pairs need a 'prompt'"),
        ({"chosen": [{"role": "user", "content": "Q"}, {"role": "model", "content": "A"}],
          "rejected": [{"role": "user", "content": "P"}, {"role": "model", "content": "B"}]},
         "share every turn but the last"),
    ]:  # fmt: skip
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=message):
            recipe.read_preference_data(path)
    with pytest.raises(SystemExit) as exit_info:
        recipe.parse_args(["--help"])
    assert exit_info.value.code == 0
