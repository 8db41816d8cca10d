"""LoRA: exact trainable counts, save/load by layer name, merge, PEFT export, int8, fit."""

import json
import os

import keras
import numpy as np
import pytest
from conftest import make_backbone
from helpers import assert_close
from helpers import to_numpy
from helpers import transformers_copy

from keras_gemma import GemmaCausalLM
from keras_gemma import lora

TOKENS = np.array([[2, 17, 99, 5, 250, 31, 7, 42], [2, 64, 3, 12, 9, 0, 0, 0]], "int32")
MASK = (TOKENS > 0).astype("int32")
INPUTS = {"token_ids": TOKENS, "padding_mask": MASK}
ALL_TARGETS = list(lora.LORA_TARGETS)


def _logits(backbone):
    return to_numpy(GemmaCausalLM(backbone)(INPUTS))


def _randomize_adapters(backbone, seed=0):
    """Non-zero adapters (Keras initializes `b` to zeros, a no-op update)."""
    rng = np.random.default_rng(seed)
    for variable in backbone.trainable_weights:
        variable.assign(rng.normal(0, 0.1, variable.shape).astype("float32"))


def _count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


def test_trainable_count_is_exactly_the_adapters():
    # Tiny MQA: hidden 32, 4 query heads, 1 kv head, head_dim 8, GeGLU 2x32, 2 layers.
    backbone = make_backbone("mqa")
    backbone.enable_lora(2)
    # query a [4, 8, 2] + b [2, 32] = 128; value a [1, 8, 2] + b [2, 32] = 80.
    assert _count(backbone.trainable_weights) == 2 * (128 + 80)
    assert all("lora_kernel" in v.path for v in backbone.trainable_weights)
    assert _count(backbone.trainable_weights) == lora.lora_parameter_count(backbone.config, 2)

    backbone = make_backbone("mqa")
    backbone.enable_lora(2, target_layer_names=ALL_TARGETS, lora_alpha=8)
    # + key 80, attention_output a [32, 2] + b [2, 32] = 128, and three
    # 32x32 feed-forward kernels at 2 * 32 + 2 * 32 = 128 each.
    assert _count(backbone.trainable_weights) == 2 * (128 + 80 + 80 + 128 + 3 * 128)
    assert lora.lora_state(backbone) == (2, 8.0, tuple(ALL_TARGETS))
    # The causal LM sees the same trainable set.
    assert _count(GemmaCausalLM(backbone).trainable_weights) == 1600


def test_enable_lora_errors():
    backbone = make_backbone("mqa")
    with pytest.raises(ValueError, match="Unknown LoRA target"):
        backbone.enable_lora(2, target_layer_names=["query", "embeddings"])
    with pytest.raises(ValueError, match="positive integer"):
        backbone.enable_lora(0)
    backbone.enable_lora(2)
    with pytest.raises(ValueError, match="already enabled"):
        backbone.enable_lora(2)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        make_backbone("mqa").save_lora_weights("unused.safetensors")


def test_save_and_load_reproduce_logits_exactly(tmp_path, layout):
    backbone = make_backbone(layout)
    backbone.enable_lora(3, target_layer_names=["query", "value", "ffw_linear"], lora_alpha=6)
    _randomize_adapters(backbone)
    expected = _logits(backbone)
    path = tmp_path / "adapters.safetensors"
    backbone.save_lora_weights(path)

    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as reader:
        meta = reader.metadata()
        keys = set(reader.keys())
    assert meta["rank"] == "3" and float(meta["lora_alpha"]) == 6.0
    assert json.loads(meta["target_layer_names"]) == ["query", "value", "ffw_linear"]
    assert "decoder_block_1/feed_forward/ffw_linear/lora_kernel_b" in keys
    assert len(keys) == 2 * 3 * 2
    # Only adapters: a small fraction of the model.
    assert os.path.getsize(path) < 4 * _count(backbone.weights) / 5

    fresh = make_backbone(layout)  # same base weights, no LoRA yet
    fresh.load_lora_weights(path)  # enables rank 3, alpha 6, the same targets
    np.testing.assert_array_equal(_logits(fresh), expected)
    assert _count(fresh.trainable_weights) == _count(backbone.trainable_weights)


def test_load_mismatches_are_clear_errors(tmp_path):
    backbone = make_backbone("mqa")
    backbone.enable_lora(2)
    path = tmp_path / "a.safetensors"
    backbone.save_lora_weights(path)

    other_rank = make_backbone("mqa")
    other_rank.enable_lora(4)
    with pytest.raises(ValueError, match="rank: file 2, model 4"):
        other_rank.load_lora_weights(path)
    other_targets = make_backbone("mqa")
    other_targets.enable_lora(2, target_layer_names=["query"])
    with pytest.raises(ValueError, match="targets"):
        other_targets.load_lora_weights(path)
    wider = make_backbone("mqa", hidden_dim=48)
    with pytest.raises(ValueError, match="different dimensions"):
        wider.load_lora_weights(path)
    deeper = make_backbone("mqa", num_layers=3)
    with pytest.raises(ValueError, match="2 decoder blocks"):
        deeper.load_lora_weights(path)

    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2, "float32")}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a keras_gemma LoRA file"):
        make_backbone("mqa").load_lora_weights(tmp_path / "other.safetensors")


def test_older_format_versions_load_as_the_same_updates(tmp_path):
    """Versions 1 and 2 stored adapters for `[in, out]`-like kernels: the
    feed-forward's (version 1: `a1 [in, r] @ b1 [r, out]`) and the attention
    output's (`a [heads, head_dim, r] @ b [r, hidden]`) are the transposes of
    today's updates; per-head query/key/value adapters cannot load."""
    from safetensors import safe_open
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file

    targets = ["attention_output", "ffw_gating", "ffw_linear"]
    backbone = make_backbone("mha", intermediate_dim=48)  # non-square kernels
    backbone.enable_lora(3, target_layer_names=targets)
    _randomize_adapters(backbone, seed=5)
    expected = _logits(backbone)
    path = tmp_path / "v3.safetensors"
    backbone.save_lora_weights(path)
    with safe_open(str(path), framework="numpy") as reader:
        metadata = reader.metadata()
    assert metadata["format_version"] == "3"
    tensors = load_file(str(path))
    config = backbone.config
    heads, head_dim = config.num_query_heads, config.head_dim
    old = {1: dict(tensors), 2: dict(tensors)}
    for name in tensors:
        if not name.endswith("/lora_kernel_a"):
            continue
        b_name = name.replace("lora_kernel_a", "lora_kernel_b")
        a, b = tensors[name], tensors[b_name]
        if "/attention_output/" in name:
            for version in (1, 2):
                old[version][name] = np.ascontiguousarray(b.T.reshape(heads, head_dim, -1))
                old[version][b_name] = np.ascontiguousarray(a.T)
        else:
            old[1][name], old[1][b_name] = np.ascontiguousarray(b.T), np.ascontiguousarray(a.T)
            assert old[1][name].shape[0] != a.shape[0]  # the layouts really differ
    for version in (1, 2):
        file = tmp_path / f"v{version}.safetensors"
        save_file(old[version], str(file), {**metadata, "format_version": str(version)})
        fresh = make_backbone("mha", intermediate_dim=48)
        fresh.load_lora_weights(file)
        np.testing.assert_allclose(_logits(fresh), expected, rtol=1e-5, atol=1e-5)

    query = make_backbone("mha", intermediate_dim=48)
    query.enable_lora(3, target_layer_names=["query"])
    query.save_lora_weights(tmp_path / "query.safetensors")
    per_head = {
        name: np.zeros((heads, config.hidden_dim, 3) if name.endswith("_a") else (3, head_dim))
        for name in load_file(str(tmp_path / "query.safetensors"))
    }
    query_metadata = {**metadata, "target_layer_names": '["query"]', "format_version": "2"}
    save_file(per_head, str(tmp_path / "v2_query.safetensors"), query_metadata)
    with pytest.raises(ValueError, match="query adapters in .*version 2.*merge_lora"):
        make_backbone("mha").load_lora_weights(tmp_path / "v2_query.safetensors")

    save_file(old[2], str(tmp_path / "v9.safetensors"), {**metadata, "format_version": "9"})
    with pytest.raises(ValueError, match="format version '9'.*Upgrade keras_gemma"):
        make_backbone("mha", intermediate_dim=48).load_lora_weights(tmp_path / "v9.safetensors")


def test_merge_folds_adapters_and_removes_them(layout):
    backbone = make_backbone(layout)
    base_count = len(backbone.weights)
    backbone.enable_lora(2, target_layer_names=ALL_TARGETS, lora_alpha=4)
    _randomize_adapters(backbone)
    lm = GemmaCausalLM(backbone)
    before = to_numpy(lm(INPUTS))
    assert np.abs(before - _logits(make_backbone(layout))).max() > 1e-2  # adapters matter
    backbone.merge_lora()
    assert len(backbone.weights) == base_count
    assert not any("lora" in v.path for v in backbone.weights)
    assert lora.lora_state(backbone) is None
    assert _count(backbone.trainable_weights) == backbone.config.num_parameters()
    assert_close(lm(INPUTS), before, atol=1e-5)
    # Merged models still generate, and LoRA can be enabled again.
    prompt = np.zeros((1, 12), "int32")
    prompt[0, :4] = TOKENS[0, :4]
    out = lm.generate({"token_ids": prompt, "padding_mask": prompt > 0}, stop_token_ids=None)
    assert out["padding_mask"].sum() == 12
    backbone.enable_lora(2)


def test_peft_export_matches_transformers_with_peft(tmp_path, layout):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    backbone = make_backbone(layout, seed=1)
    backbone.enable_lora(2, target_layer_names=ALL_TARGETS, lora_alpha=3)
    _randomize_adapters(backbone, seed=1)
    backbone.export_lora_to_peft(tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }

    base = make_backbone(layout, seed=1)
    reference = transformers_copy(base)
    adapted = peft.PeftModel.from_pretrained(reference, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        theirs = adapted(
            input_ids=torch.from_numpy(TOKENS).long(),
            attention_mask=torch.from_numpy(MASK).long(),
        ).logits.numpy()
    ours = _logits(backbone)
    valid = MASK.astype(bool)
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-4)
    # The adapters changed the logits, so the comparison tests them.
    assert np.abs(ours - _logits(base))[valid].max() > 1e-2


def _next_token_data():
    x = {"token_ids": TOKENS, "padding_mask": MASK}
    y = np.zeros_like(TOKENS)
    y[:, :-1] = TOKENS[:, 1:]
    weights = np.zeros_like(MASK)
    weights[:, :-1] = MASK[:, 1:]
    return x, y, weights.astype("float32")


def _fit_losses(lm, epochs=6):
    x, y, weights = _next_token_data()
    lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = lm.fit(x, y, sample_weight=weights, batch_size=2, epochs=epochs, verbose=0)
    return history.history["loss"]


def test_lora_fit_lowers_loss_and_leaves_base_frozen():
    backbone = make_backbone("mqa")
    frozen = {v.path: to_numpy(v) for v in backbone.weights}
    backbone.enable_lora(4, target_layer_names=["query", "value", "ffw_gating"])
    losses = _fit_losses(GemmaCausalLM(backbone))
    assert losses[-1] < losses[0] - 0.1, losses
    for variable in backbone.weights:
        if variable.path in frozen:
            np.testing.assert_array_equal(to_numpy(variable), frozen[variable.path])


def _projections(layer):
    return isinstance(layer, keras.layers.EinsumDense)


def _quantize_for_lora(backbone):
    # Weight-only int8 can't backpropagate on torch (a Keras bug, refused
    # with a clear error); int8 activations can.
    config = None
    if keras.config.backend() == "torch":
        config = keras.quantizers.Int8QuantizationConfig()
    backbone.quantize("int8", config=config, filters=_projections)


def test_lora_on_int8_base_trains(tmp_path):
    backbone = make_backbone("mqa")
    _quantize_for_lora(backbone)
    int8_kernels = {v.path: to_numpy(v) for v in backbone.weights if v.dtype == "int8"}
    assert int8_kernels  # the projections really are int8
    backbone.enable_lora(4)
    assert all("lora_kernel" in v.path for v in backbone.trainable_weights)
    losses = _fit_losses(GemmaCausalLM(backbone))
    # Slower on TensorFlow (4.07 -> 3.99 in 6 steps) than JAX/torch (> 0.1).
    assert losses[-1] < losses[0] - 0.05, losses
    for variable in backbone.weights:
        if variable.path in int8_kernels:
            np.testing.assert_array_equal(to_numpy(variable), int8_kernels[variable.path])
    # Adapters of a quantized base save and load like any others.
    backbone.save_lora_weights(tmp_path / "q.safetensors")
    fresh = make_backbone("mqa")
    _quantize_for_lora(fresh)
    fresh.load_lora_weights(tmp_path / "q.safetensors")
    np.testing.assert_array_equal(_logits(fresh), _logits(backbone))


def test_lora_on_int8_base_equals_the_dequantized_kernels_plus_the_update():
    # Keras's quantized call assumes a kernel's last axis is an output axis;
    # ours is the input axis (`[out..., in]`), so `project` computes the update.
    backbone = make_backbone("gqa")
    backbone.quantize("int8", filters=_projections)
    backbone.enable_lora(2, target_layer_names=ALL_TARGETS, lora_alpha=6)
    _randomize_adapters(backbone, seed=3)
    reference = make_backbone("gqa")
    ours = {v.path: v for v in backbone.weights}
    for variable in reference.weights:
        layer = variable.path.rsplit("/", 1)[0]
        if not variable.path.endswith("/kernel"):
            variable.assign(to_numpy(ours[variable.path]))
            continue
        kernel = to_numpy(ours[variable.path]).astype("float64")
        scale = to_numpy(ours[f"{layer}/kernel_scale"]).reshape(*kernel.shape[:-1], 1)
        a, b = to_numpy(ours[f"{layer}/lora_kernel_a"]), to_numpy(ours[f"{layer}/lora_kernel_b"])
        variable.assign(kernel / scale + 3.0 * np.matmul(a, b))
    expected = _logits(reference)
    np.testing.assert_allclose(_logits(backbone), expected, atol=1e-4 * np.abs(expected).max())


@pytest.mark.skipif(keras.config.backend() != "torch", reason="a torch-only Keras limitation")
def test_lora_on_weight_only_int8_says_how_to_train_on_torch():
    backbone = make_backbone("mqa")
    backbone.quantize("int8")
    backbone.enable_lora(4)  # adapters load and serve; only training is refused
    with pytest.raises(ValueError, match="Int8QuantizationConfig"):
        _fit_losses(GemmaCausalLM(backbone))
