"""Logits and greedy tokens equal independent implementations' on the same weights."""

import numpy as np
import pytest
from conftest import make_backbone
from conftest import tiny_backbone_kwargs
from helpers import to_numpy
from helpers import transformers_copy

from keras_gemma import GemmaCausalLM
from keras_gemma.weight_names import assign_to_keras_hub

TOKENS = np.array(
    [[2, 17, 99, 5, 250, 31, 7, 42, 8, 300], [2, 64, 3, 12, 0, 0, 0, 0, 0, 0]], "int32"
)
MASK = (np.arange(10)[None] < np.array([[10], [4]])).astype("int32")


def _keras_hub_copy(backbone, layout):
    keras_hub = pytest.importorskip("keras_hub")
    reference = keras_hub.models.GemmaBackbone(**tiny_backbone_kwargs(layout))
    assert len(reference.weights) == len(backbone.weights)
    assign_to_keras_hub(backbone, reference)
    return keras_hub, reference


def test_logits_match_keras_hub(layout):
    backbone = make_backbone(layout)
    keras_hub, reference = _keras_hub_copy(backbone, layout)
    reference_lm = keras_hub.models.GemmaCausalLM(reference)
    inputs = {"token_ids": TOKENS, "padding_mask": MASK}
    ours = to_numpy(GemmaCausalLM(backbone)(inputs))
    theirs = to_numpy(reference_lm(inputs))
    valid = MASK.astype(bool)
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-4)


def test_greedy_generation_matches_keras_hub(layout):
    backbone = make_backbone(layout, seed=3)
    keras_hub, reference = _keras_hub_copy(backbone, layout)
    reference_lm = keras_hub.models.GemmaCausalLM(reference)
    reference_lm.compile(sampler="greedy")
    length = 40
    prompt = np.zeros((1, length), "int32")
    prompt[0, :6] = [2, 40, 41, 42, 43, 44]
    mask = (prompt > 0).astype("int32")
    inputs = {"token_ids": prompt, "padding_mask": mask}
    ours = GemmaCausalLM(backbone).generate(inputs, stop_token_ids=None)
    theirs = reference_lm.generate(inputs, stop_token_ids=None)
    np.testing.assert_array_equal(ours["token_ids"], to_numpy(theirs["token_ids"]))
    assert (ours["token_ids"][0, 6:] != 0).any()  # 34 generated steps, not padding


def test_logits_match_huggingface_transformers(layout):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    backbone = make_backbone(layout, seed=1)
    reference = transformers_copy(backbone)
    with torch.no_grad():
        theirs = reference(
            input_ids=torch.from_numpy(TOKENS).long(),
            attention_mask=torch.from_numpy(MASK).long(),
        ).logits.numpy()
    ours = to_numpy(GemmaCausalLM(backbone)({"token_ids": TOKENS, "padding_mask": MASK}))
    valid = MASK.astype(bool)
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-4)
