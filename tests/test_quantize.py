import keras
import numpy as np
import pytest
from conftest import make_backbone
from helpers import to_numpy

from keras_gemma import GemmaCausalLM
from keras_gemma import GemmaCausalLMPreprocessor

INPUTS = {"token_ids": np.array([[2, 40, 41, 42, 43, 44]]), "padding_mask": np.ones((1, 6))}


def test_int8_quantization_keeps_logits_close_and_shrinks_weights():
    lm = GemmaCausalLM(make_backbone("mha", seed=9))
    before = to_numpy(lm(INPUTS))
    float_bytes = sum(np.prod(v.shape) * 4 for v in lm.weights)
    lm.quantize("int8")
    assert lm.backbone.get_config()["quantization_mode"] == "int8"
    # Weight-only by default: activations are not quantized.
    query = lm.backbone.transformer_layers[0].attention.query_dense
    assert query.inputs_quantizer is None
    assert lm.backbone.token_embedding.inputs_quantizer is None
    kernels = [v for v in lm.weights if v.path.endswith("kernel") or v.path.endswith("embeddings")]
    assert all(keras.backend.standardize_dtype(v.dtype) == "int8" for v in kernels)
    int8_bytes = sum(
        np.prod(v.shape) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
        for v in lm.weights
    )
    assert int8_bytes < 0.35 * float_bytes
    after = to_numpy(lm(INPUTS))
    # Per-channel int8 weights: logits move a little, the ranking barely.
    assert np.abs(after - before).max() < 0.1 * np.abs(before).max()
    assert (after.argmax(-1) == before.argmax(-1)).mean() >= 0.8


def test_quantized_model_generates_saves_and_loads(tmp_path, tokenizer):
    lm = GemmaCausalLM(make_backbone("mqa", seed=2), GemmaCausalLMPreprocessor(tokenizer, 24))
    lm.quantize("int8")
    text = lm.generate("The", max_length=16)
    path = tmp_path / "int8.keras"
    lm.save(path)
    restored = keras.saving.load_model(path)
    assert restored.backbone.get_config()["quantization_mode"] == "int8"
    np.testing.assert_array_equal(to_numpy(restored(INPUTS)), to_numpy(lm(INPUTS)))
    assert restored.generate("The", max_length=16) == text


def test_an_explicit_config_still_quantizes_activations():
    backbone = make_backbone("mqa", seed=9)
    backbone.quantize("int8", config=keras.quantizers.Int8QuantizationConfig())
    assert backbone.transformer_layers[0].attention.query_dense.inputs_quantizer is not None


def test_int8_presets_round_trip_without_float_weights(tmp_path, tokenizer):
    lm = GemmaCausalLM(make_backbone("gqa", seed=4), GemmaCausalLMPreprocessor(tokenizer, 24))
    lm.quantize("int8")
    lm.save_to_preset(tmp_path / "int8")
    restored = GemmaCausalLM.from_preset(tmp_path / "int8")
    int8 = [v for v in restored.weights if keras.backend.standardize_dtype(v.dtype) == "int8"]
    assert len(int8) == 1 + 7 * lm.backbone.num_layers  # embedding and every projection
    for ours, theirs in zip(lm.weights, restored.weights):
        assert ours.path == theirs.path
        np.testing.assert_array_equal(to_numpy(ours), to_numpy(theirs))
    assert restored.generate("The", max_length=16) == lm.generate("The", max_length=16)


def test_quantized_models_do_not_export_to_huggingface(tmp_path):
    lm = GemmaCausalLM(make_backbone("mqa", seed=4))
    lm.quantize("int8")
    with pytest.raises(ValueError, match="quantized"):
        lm.export_to_huggingface(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_int8_greedy_follows_bfloat16_on_a_trained_model(tokenizer):
    from conftest import TOKENIZER_CORPUS

    preprocessor = GemmaCausalLMPreprocessor(tokenizer, 40)
    trained = GemmaCausalLM(make_backbone("mqa", seed=6, hidden_dim=64), preprocessor)
    trained.compile(optimizer=keras.optimizers.Adam(1e-2))
    # Loss ~0.2 after this: confident predictions, as in a real model (a random
    # model's near-ties would flip under any rounding).
    trained.fit(TOKENIZER_CORPUS * 8, batch_size=16, epochs=6, verbose=0)
    models = {}
    for name in ("bfloat16", "int8"):
        models[name] = GemmaCausalLM(
            make_backbone("mqa", seed=6, hidden_dim=64, dtype="bfloat16"), preprocessor
        )
        for low, high in zip(models[name].weights, trained.weights):
            low.assign(keras.ops.cast(high, "bfloat16"))
    models["int8"].quantize("int8")
    prompts = ["The quick", "She sells", "To be, or"]
    batch = preprocessor.generate_preprocess(prompts, 40)
    start = batch["padding_mask"].sum(axis=1)
    tokens = {
        name: lm.generate(batch, stop_token_ids=None)["token_ids"] for name, lm in models.items()
    }
    generated = np.arange(40)[None] >= start[:, None]
    agreement = (tokens["int8"] == tokens["bfloat16"])[generated].mean()
    assert agreement >= 0.75, agreement


def test_partly_quantized_models_refuse_presets_clearly(tmp_path):
    backbone = make_backbone("mqa", seed=4)
    backbone.quantize("int8", filters=lambda layer: isinstance(layer, keras.layers.EinsumDense))
    with pytest.raises(ValueError, match="quantized the same way"):
        backbone.save_to_preset(tmp_path / "partial")
    assert not (tmp_path / "partial").exists()


def test_int8_presets_load_without_ever_making_float_kernels(tmp_path, monkeypatch, tokenizer):
    """The loader builds the int8 variables directly: no float variable, and
    no float array read or cast on its way into one, ever has the shape of a
    quantized kernel (a float-then-quantize loader makes both). The same
    code path on every backend."""
    from keras_gemma.checkpoints import _io

    lm = GemmaCausalLM(make_backbone("gqa", seed=4), GemmaCausalLMPreprocessor(tokenizer, 24))
    lm.quantize("int8")
    lm.save_to_preset(tmp_path / "int8")
    created, cast = [], []
    init, cast_array = keras.Variable.__init__, _io._cast

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        created.append((self.path, tuple(self.shape), keras.backend.standardize_dtype(self.dtype)))

    def recording_cast(array, dtype):
        cast.append((tuple(array.shape), np.dtype(array.dtype).name))
        return cast_array(array, dtype)

    monkeypatch.setattr(keras.Variable, "__init__", recording_init)
    monkeypatch.setattr(_io, "_cast", recording_cast)
    restored = GemmaCausalLM.from_preset(tmp_path / "int8")
    monkeypatch.undo()
    quantized = {
        tuple(v.shape)
        for v in restored.weights
        if keras.backend.standardize_dtype(v.dtype) == "int8"
    }
    assert len(quantized) >= 3  # the embedding table and the projections' shapes
    assert {v.path for v in restored.weights} <= {path for path, _, _ in created}
    float_variables = [c for c in created if c[1] in quantized and c[2] != "int8"]
    assert not float_variables, float_variables
    float_arrays = [c for c in cast if c[0] in quantized and c[1] != "int8"]
    assert not float_arrays, float_arrays
    assert sum(dtype == "int8" for _, dtype in cast) == 1 + 7 * lm.backbone.num_layers
    np.testing.assert_array_equal(to_numpy(restored(INPUTS)), to_numpy(lm(INPUTS)))
