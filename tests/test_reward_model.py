"""GemmaRewardModel: Bradley–Terry training, where the reward is read, presets, bad input."""

import keras
import numpy as np
import pytest
from conftest import make_backbone
from helpers import assert_close
from helpers import to_numpy

from keras_gemma import GemmaCausalLM
from keras_gemma import GemmaCausalLMPreprocessor
from keras_gemma import GemmaTokenizer
from keras_gemma.alignment.reward_model import GemmaRewardModel
from keras_gemma.alignment.reward_model import check_preferences
from keras_gemma.alignment.reward_model import check_same_tokenizer
from keras_gemma.tokenizer import train_sentencepiece

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


def _model(tokenizer, sequence_length=24, **kwargs):
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
    held = model.evaluate(PAIRS, batch_size=4, verbose=0, return_dict=True)
    assert held["accuracy"] == 1.0


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
    ids, mask = batch["chosen_token_ids"], batch["chosen_padding_mask"]
    last = mask.sum(axis=1) - 1
    assert (ids[np.arange(len(ids)), last] == tokenizer.end_token_id).all()
    hidden = to_numpy(model.backbone({"token_ids": ids, "padding_mask": mask}))
    kernel = to_numpy(model.reward_head.kernel)[:, 0]
    assert_close(rewards[:, 0], hidden[np.arange(len(ids)), last] @ kernel, atol=1e-5)


def test_reward_is_read_at_the_last_real_token_whatever_the_padding(tokenizer):
    model = _model(tokenizer)
    model.reward_head.kernel.assign(np.random.default_rng(0).normal(size=(32, 1)))
    short = {"prompts": ["Hi"], "responses": ["A fox."]}
    long = {
        "prompts": ["Hi", "What is 12 plus 30? Answer in full."],
        "responses": ["A fox.", "12 plus 30 is 42, the answer."],
    }
    alone = model.predict(short, verbose=0)
    batched = model.predict(long, verbose=0)
    assert_close(batched[0], alone[0], atol=1e-5)
    assert batched[0] != batched[1]
    # Right-padding length never matters.
    for length in (12, 40):
        tokens = model.preprocess_responses(short, sequence_length=length)
        assert_close(
            model.compute_rewards(tokens["token_ids"], tokens["padding_mask"]), alone, atol=1e-5
        )


def test_predict_returns_one_float_per_row(tokenizer):
    model = _model(tokenizer)
    rewards = model.predict({"prompts": PAIRS["prompts"], "responses": PAIRS["chosen"]}, verbose=0)
    assert rewards.shape == (4,) and rewards.dtype == np.float32
    conversations = [
        [{"role": "user", "content": p}, {"role": "model", "content": c}]
        for p, c in zip(PAIRS["prompts"], PAIRS["chosen"])
    ]
    assert model.predict({"messages": conversations}, verbose=0).shape == (4,)


def test_conversations_train(tokenizer):
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
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    assert np.isfinite(model.fit(data, batch_size=4, verbose=0).history["loss"]).all()


def test_preset_round_trip_gives_equal_rewards(tokenizer, tmp_path):
    model = _model(tokenizer)
    model.reward_head.kernel.assign(np.random.default_rng(1).normal(size=(32, 1)))
    responses = {"prompts": PAIRS["prompts"], "responses": PAIRS["rejected"]}
    model.save_to_preset(tmp_path / "rm")
    loaded = GemmaRewardModel.from_preset(tmp_path / "rm")
    assert_close(loaded.predict(responses, verbose=0), model.predict(responses, verbose=0))
    assert loaded.preprocessor.sequence_length == 24
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
        make_backbone("mqa", seed=0, dropout=0.5), GemmaCausalLMPreprocessor(tokenizer, 24)
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
