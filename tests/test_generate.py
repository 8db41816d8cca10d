import gc
import itertools
import weakref

import keras
import numpy as np
import pytest
from conftest import make_backbone
from helpers import to_numpy

from keras_gemma import BeamSampler
from keras_gemma import GemmaCausalLM
from keras_gemma import GemmaCausalLMPreprocessor
from keras_gemma import RandomSampler
from keras_gemma import TopKSampler
from keras_gemma import TopPSampler
from keras_gemma import generation

PROMPTS = ["What is 3 plus 4?", "The", "A banana is yellow and the sky is"]


@pytest.fixture(scope="module")
def lm(tokenizer):
    return GemmaCausalLM(make_backbone("mqa", seed=5), GemmaCausalLMPreprocessor(tokenizer, 32))


def _prompt_batch(prompt, length):
    token_ids = np.zeros((1, length), "int32")
    token_ids[0, : len(prompt)] = prompt
    return {"token_ids": token_ids, "padding_mask": (token_ids > 0).astype("int32")}


def test_greedy_cached_generation_equals_full_recomputation(lm):
    """Every cached greedy step picks the argmax of a full forward pass over
    the same sequence (teacher forcing the generated tokens)."""
    lm.compile(sampler="greedy")
    out = lm.generate(_prompt_batch([2, 30, 31, 32], 20), stop_token_ids=None)
    ids = out["token_ids"]
    logits = to_numpy(lm({"token_ids": ids, "padding_mask": np.ones_like(ids)}))
    assert ids[0, 4:].tolist() == logits[0, 3:-1].argmax(axis=-1).tolist()


def test_batched_prompts_of_different_lengths_match_alone(lm):
    lm.compile(sampler="greedy")
    batched = lm.generate(PROMPTS, max_length=24)
    alone = [lm.generate(prompt, max_length=24) for prompt in PROMPTS]
    assert batched == alone
    assert all(text.startswith(prompt) for text, prompt in zip(batched, PROMPTS))


def test_strip_prompt_returns_only_new_text(lm):
    lm.compile(sampler="greedy")
    full = lm.generate(PROMPTS[0], max_length=20)
    new = lm.generate(PROMPTS[0], max_length=20, strip_prompt=True)
    assert full == PROMPTS[0] + new


def test_generation_stops_at_stop_token(lm):
    lm.compile(sampler="greedy")
    batch = lm.preprocessor.generate_preprocess([PROMPTS[0]], sequence_length=24)
    prompt_length = int(batch["padding_mask"].sum())
    free = lm.generate(batch, stop_token_ids=None)["token_ids"][0, prompt_length:].tolist()
    stop = free[2]
    first = free.index(stop)
    out = lm.generate(batch, stop_token_ids=[stop])
    end = prompt_length + first + 1  # the stop token itself is kept
    assert out["padding_mask"][0].tolist() == [1] * end + [0] * (24 - end)
    # The loop ended at the stop: nothing was written after it.
    assert (out["token_ids"][0, end:] == 0).all()
    text = lm.generate(PROMPTS[0], max_length=24, stop_token_ids=[stop], strip_prompt=True)
    assert text == lm.preprocessor.tokenizer.detokenize(free[:first])


def test_seeded_sampling_is_reproducible(lm):
    outputs = []
    for seed in (7, 7, 8):
        lm.compile(sampler=TopKSampler(k=50, seed=seed, temperature=2.0))
        outputs.append(lm.generate(PROMPTS, max_length=24))
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]
    # The sampler's stream advances: a second call is a fresh draw.
    assert lm.generate(PROMPTS, max_length=24) != outputs[2]


@pytest.mark.parametrize(
    "sampler", [TopKSampler(k=1, seed=0), TopPSampler(p=1e-6, seed=0), BeamSampler(num_beams=1)]
)
def test_degenerate_samplers_equal_greedy(lm, sampler):
    lm.compile(sampler="greedy")
    greedy = lm.generate(PROMPTS, max_length=20)
    lm.compile(sampler=sampler)
    assert lm.generate(PROMPTS, max_length=20) == greedy


@pytest.mark.parametrize(
    "name, cls, defaults",
    [
        ("random", RandomSampler, {}),
        ("top_k", TopKSampler, {"k": 5}),
        ("top_p", TopPSampler, {"p": 0.1, "k": None}),
        ("beam", BeamSampler, {"num_beams": 5}),
    ],
)
def test_samplers_by_name(lm, name, cls, defaults):
    # A name gives keras-hub's sampler with its defaults; what each one draws
    # is checked in test_samplers.py.
    lm.compile(sampler=name)
    assert type(lm.sampler) is cls
    assert {key: getattr(lm.sampler, key) for key in defaults} == defaults
    assert lm.sampler.temperature == 1.0
    texts = lm.generate(PROMPTS[:2], max_length=16)
    assert [t[: len(p)] for t, p in zip(texts, PROMPTS)] == PROMPTS[:2]


def test_strip_prompt_on_token_inputs_masks_the_prompt(lm):
    lm.compile(sampler="greedy")
    batch = lm.preprocessor.generate_preprocess(PROMPTS, sequence_length=20)
    full = lm.generate(batch, stop_token_ids=None)
    new = lm.generate(batch, stop_token_ids=None, strip_prompt=True)
    assert (new["token_ids"] == full["token_ids"]).all()
    # The mask covers the generated tokens only.
    assert (new["padding_mask"] == full["padding_mask"] * (1 - batch["padding_mask"])).all()
    lengths = batch["padding_mask"].sum(axis=1)
    assert new["padding_mask"].sum(axis=1).tolist() == (20 - lengths).tolist()


def test_stop_token_ids_are_validated(lm):
    lm.compile(sampler="greedy")
    for bad in ([384], [-1], [5, 400]):
        with pytest.raises(ValueError, match="must be in \\[0, 384\\)"):
            lm.generate("The", max_length=8, stop_token_ids=bad)
    tokenizer = lm.preprocessor.tokenizer
    assert lm.resolve_stop_token_ids("auto") == (tokenizer.end_token_id, tokenizer.end_of_turn_id)
    assert lm.resolve_stop_token_ids(None) == ()
    assert lm.resolve_stop_token_ids([3, np.int64(7)]) == (3, 7)
    assert lm.resolve_stop_token_ids(np.array([3, 7])) == (3, 7)  # an array is ids, not "auto"
    with pytest.raises(ValueError, match="'auto', None or token ids"):
        lm.resolve_stop_token_ids("end_of_turn")
    with pytest.raises(ValueError, match="needs a preprocessor"):
        GemmaCausalLM(lm.backbone).generate({"token_ids": [[2]], "padding_mask": [[1]]})


def test_beam_search_finds_the_most_likely_continuation():
    # Vocabulary of 16 and 16 beams: two steps of beam search are exhaustive.
    lm = GemmaCausalLM(make_backbone("mha", seed=2, vocabulary_size=16))
    lm.compile(sampler=BeamSampler(num_beams=16))
    prompt = [2, 5, 9]
    token_ids = np.zeros((1, 5), "int32")
    token_ids[0, :3] = prompt
    out = lm.generate({"token_ids": token_ids, "padding_mask": token_ids > 0}, stop_token_ids=None)
    candidates = np.array([prompt + list(pair) for pair in itertools.product(range(16), repeat=2)])
    log_probs = to_numpy(lm.score(candidates, scoring_mode="log_probs"))[:, 2:4].sum(axis=1)
    assert out["token_ids"][0].tolist() == candidates[log_probs.argmax()].tolist()


def test_bfloat16_generation_follows_float32(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, 24)
    float32 = GemmaCausalLM(make_backbone("mqa", seed=5), preprocessor)
    bfloat16 = GemmaCausalLM(make_backbone("mqa", seed=5, dtype="bfloat16"), preprocessor)
    for low, high in zip(bfloat16.weights, float32.weights):
        low.assign(keras.ops.cast(high, "bfloat16"))
    batch = preprocessor.generate_preprocess(PROMPTS, 24)
    ours = bfloat16.generate(batch, stop_token_ids=None)["token_ids"]
    reference = float32.generate(batch, stop_token_ids=None)["token_ids"]
    # Rounding may flip a near-tie and the continuations then diverge, so
    # compare the first generated token of each row.
    first = batch["padding_mask"].sum(axis=1)
    assert (ours[np.arange(3), first] == reference[np.arange(3), first]).mean() >= 2 / 3


def test_bad_generate_inputs_are_clear_errors(lm):
    with pytest.raises(ValueError, match="empty"):
        lm.generate([])
    with pytest.raises(TypeError, match="only strings"):
        lm.generate(["fine", 3])
    with pytest.raises(TypeError, match="string or a list of strings"):
        lm.generate(42)
    with pytest.raises(ValueError, match="greater than the longest prompt"):
        lm.generate("What is 3 plus 4?", max_length=4)
    with pytest.raises(ValueError, match="Unknown sampler 'nucleus'"):
        lm.compile(sampler="nucleus")
    bad = np.array([[2, 5, 10_000, 0]], "int32")
    with pytest.raises(ValueError, match="must be in \\[0, 384\\)"):
        lm.generate({"token_ids": bad, "padding_mask": bad > 0})
    with pytest.raises(ValueError, match="right-padded"):
        lm.generate({"token_ids": np.array([[0, 2, 5, 0]]), "padding_mask": [[0, 1, 1, 0]]})


def test_no_recompilation_within_a_bucket(lm, monkeypatch):
    if keras.config.backend() == "torch":
        pytest.skip("torch decodes eagerly: nothing is traced")
    lm.compile(sampler="greedy")
    traces = []
    prefill = generation.KerasDecoder.prefill
    monkeypatch.setattr(
        generation.KerasDecoder, "prefill", lambda *args: traces.append(1) or prefill(*args)
    )
    # Prompts of 2-6 tokens and totals of 25-32 share one bucket each.
    for prompt, max_length in [("The", 25), ("What is 3 plus", 28), ("A banana", 32)]:
        lm.generate(prompt, max_length=max_length)
    assert len(traces) == 1


@pytest.mark.parametrize("change", ["quantize", "merge_lora"])
def test_generate_releases_weights_the_model_replaced(tokenizer, change):
    # The compile cache holds the variables it was traced with; once the
    # model replaces them, the next generate must let the old ones go.
    lm = GemmaCausalLM(make_backbone("mqa", seed=5), GemmaCausalLMPreprocessor(tokenizer, 32))
    query = lm.backbone.transformer_layers[0].attention.query_dense
    if change == "merge_lora":
        lm.backbone.enable_lora(2)
    lm.generate("The", max_length=20)
    replaced = weakref.ref(query.lora_kernel_a if change == "merge_lora" else query.kernel)
    if change == "merge_lora":
        lm.backbone.merge_lora()
    else:
        lm.quantize("int8")
    lm.generate("The", max_length=20)
    gc.collect()
    assert replaced() is None
