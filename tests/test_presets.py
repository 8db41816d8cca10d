"""Presets and checkpoints: both layouts both ways, lean loading, atomic saves, clear failures.

Checkpoints are made here with the reference libraries (keras-hub's
`save_to_preset`, transformers' `save_pretrained`) on tiny models with a
tiny trained vocabulary; nothing is downloaded.
"""

import importlib.resources
import json
import shutil
import sys

import keras
import numpy as np
import pytest
from conftest import make_backbone
from conftest import tiny_backbone_kwargs
from helpers import to_numpy
from helpers import transformers_copy

from keras_gemma import GemmaBackbone
from keras_gemma import GemmaCausalLM
from keras_gemma import GemmaCausalLMPreprocessor
from keras_gemma import GemmaTokenizer
from keras_gemma import checkpoints
from keras_gemma.checkpoints import CheckpointError
from keras_gemma.checkpoints import PresetDownloadError
from keras_gemma.tokenizer import train_sentencepiece
from keras_gemma.weight_names import assign_to_keras_hub

TOKENS = np.array([[2, 17, 99, 5, 250, 31, 7, 42], [2, 64, 3, 12, 0, 0, 0, 0]], "int32")
MASK = (np.arange(8)[None] < np.array([[8], [4]])).astype("int32")
INPUTS = {"token_ids": TOKENS, "padding_mask": MASK}
VALID = MASK.astype(bool)


def assert_same_logits(ours, theirs):
    difference = np.abs(to_numpy(ours)[VALID] - to_numpy(theirs)[VALID]).max()
    assert difference <= 1e-4, difference


# Checkpoints written by the reference libraries, once per module.


@pytest.fixture(scope="module")
def keras_hub_preset(tmp_path_factory, vocab_proto):
    """A keras-hub `save_to_preset` directory and the keras-hub model that wrote it."""
    keras_hub = pytest.importorskip("keras_hub")
    backbone = make_backbone("mqa", seed=4)
    reference = keras_hub.models.GemmaBackbone(**tiny_backbone_kwargs("mqa"))
    assign_to_keras_hub(backbone, reference)
    tokenizer = keras_hub.models.GemmaTokenizer(proto=vocab_proto)
    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(tokenizer, sequence_length=48)
    model = keras_hub.models.GemmaCausalLM(reference, preprocessor)
    directory = tmp_path_factory.mktemp("keras_hub") / "preset"
    model.save_to_preset(str(directory))
    return directory, model


@pytest.fixture(scope="module")
def huggingface_checkpoint(tmp_path_factory, vocab_proto):
    """A transformers `save_pretrained` (safetensors) directory plus tokenizer.model."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    model = transformers_copy(make_backbone("gqa", seed=5))
    directory = tmp_path_factory.mktemp("hf") / "checkpoint"
    model.save_pretrained(directory, safe_serialization=True)
    (directory / "tokenizer.model").write_bytes(vocab_proto)
    return directory, model


def transformers_logits(model):
    import torch

    with torch.no_grad():
        return model(
            input_ids=torch.from_numpy(TOKENS).long(),
            attention_mask=torch.from_numpy(MASK).long(),
        ).logits.numpy()


def copy_preset(source, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(source, target)
    return target


# The preset table.


def test_every_gemma_1_preset_is_listed_with_its_sources():
    names = {
        "gemma_2b_en",
        "gemma_instruct_2b_en",
        "gemma_1.1_instruct_2b_en",
        "gemma_7b_en",
        "gemma_instruct_7b_en",
        "gemma_1.1_instruct_7b_en",
        "code_gemma_2b_en",
        "code_gemma_1.1_2b_en",
        "code_gemma_7b_en",
        "code_gemma_instruct_7b_en",
        "code_gemma_1.1_instruct_7b_en",
    }
    for cls in (GemmaCausalLM, GemmaBackbone, GemmaTokenizer, GemmaCausalLMPreprocessor):
        assert set(cls.presets) == names
    from keras_gemma.presets import preset_config

    for name, preset in GemmaCausalLM.presets.items():
        assert preset_config(name).num_parameters() == preset["params"]
        assert preset["kaggle_handle"].startswith("kaggle://keras/")
        assert f"/keras/{name}/" in preset["kaggle_handle"]
        assert preset["huggingface_repo"].startswith("google/")
        assert preset["instruction_tuned"] == ("instruct" in name)
        assert preset["description"]
    assert GemmaCausalLM.presets["gemma_2b_en"]["huggingface_repo"] == "google/gemma-2b"
    assert GemmaCausalLM.presets["gemma_2b_en"]["params"] == 2506172416


def test_preset_data_ships_inside_the_package():
    # Read through importlib.resources, as an installed wheel is read;
    # pyproject's package-data includes it.
    data = importlib.resources.files("keras_gemma").joinpath("preset_data/gemma.json")
    assert len(json.loads(data.read_text())["presets"]) == 11


# keras-hub's Keras layout, both ways.


def test_keras_hub_preset_loads_with_same_logits(keras_hub_preset):
    directory, reference = keras_hub_preset
    assert checkpoints.detect_layout(directory) == "keras"
    model = GemmaCausalLM.from_preset(directory)
    assert model.preprocessor.sequence_length == 48
    assert_same_logits(model(INPUTS), reference(INPUTS))
    backbone = GemmaBackbone.from_preset(str(directory))
    assert backbone.config == model.backbone.config
    tokenizer = GemmaTokenizer.from_preset(directory)
    assert tokenizer.proto == model.preprocessor.tokenizer.proto
    assert GemmaCausalLMPreprocessor.from_preset(directory, sequence_length=9).sequence_length == 9


def test_save_to_preset_loads_in_keras_hub_with_same_logits(tmp_path, tokenizer):
    keras_hub = pytest.importorskip("keras_hub")
    model = GemmaCausalLM(make_backbone("mha", seed=6), GemmaCausalLMPreprocessor(tokenizer, 32))
    model.save_to_preset(tmp_path / "ours")
    reference = keras_hub.models.GemmaCausalLM.from_preset(str(tmp_path / "ours"))
    assert_same_logits(model(INPUTS), reference(INPUTS))
    assert reference.preprocessor.sequence_length == 32
    # And back.
    assert_same_logits(GemmaCausalLM.from_preset(tmp_path / "ours")(INPUTS), reference(INPUTS))


def test_sharded_keras_weights_load(tmp_path, keras_hub_preset):
    directory, reference = keras_hub_preset
    sharded = copy_preset(directory, tmp_path)
    (sharded / "model.weights.h5").unlink()
    reference.backbone.save_weights(str(sharded / "model.weights.json"), max_shard_size=6e-5)
    assert len(list(sharded.glob("model_*.weights.h5"))) > 1
    assert_same_logits(GemmaCausalLM.from_preset(sharded)(INPUTS), reference(INPUTS))


# Hugging Face layout, both ways.


def test_huggingface_checkpoint_loads_with_same_logits(huggingface_checkpoint):
    directory, reference = huggingface_checkpoint
    assert checkpoints.detect_layout(directory) == "huggingface"
    model = GemmaCausalLM.from_preset(directory)
    assert_same_logits(model(INPUTS), transformers_logits(reference))


def test_sharded_huggingface_checkpoint_loads(tmp_path, huggingface_checkpoint):
    directory, reference = huggingface_checkpoint
    sharded = tmp_path / "sharded"
    reference.save_pretrained(sharded, safe_serialization=True, max_shard_size="30KB")
    (sharded / "tokenizer.model").write_bytes((directory / "tokenizer.model").read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file()
    model = GemmaCausalLM.from_preset(sharded)
    assert_same_logits(model(INPUTS), transformers_logits(reference))


def test_huggingface_export_loads_in_transformers_with_same_logits(tmp_path, tokenizer):
    transformers = pytest.importorskip("transformers")
    model = GemmaCausalLM(make_backbone("mqa", seed=7), GemmaCausalLMPreprocessor(tokenizer, 16))
    model.export_to_huggingface(tmp_path / "export")
    reference = transformers.GemmaForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert_same_logits(model(INPUTS), transformers_logits(reference))
    assert (tmp_path / "export" / "tokenizer.model").read_bytes() == tokenizer.proto


# Options.


def test_load_weights_false_and_dtype(keras_hub_preset):
    directory, reference = keras_hub_preset
    fresh = GemmaBackbone.from_preset(directory, load_weights=False)
    loaded = GemmaBackbone.from_preset(directory)
    assert fresh.config == loaded.config
    assert not np.allclose(to_numpy(fresh.weights[0]), to_numpy(loaded.weights[0]))
    half = GemmaCausalLM.from_preset(directory, dtype="bfloat16")
    assert half.backbone.dtype_policy.name == "bfloat16"
    assert {keras.backend.standardize_dtype(v.dtype) for v in half.weights} == {"bfloat16"}
    # bfloat16 weights and compute against float32: measured at most 0.031 of
    # logits ~1.1 (7 u, u = 2**-8, the bfloat16 rounding); allowed 16 u of the
    # largest logit, where the old bound (0.5) let half a logit go wrong.
    expected = to_numpy(reference(INPUTS))
    np.testing.assert_allclose(
        to_numpy(keras.ops.cast(half(INPUTS), "float32")),
        expected,
        atol=16 * 2**-8 * np.abs(expected).max(),
    )


def test_from_preset_builds_the_class_it_is_called_on(keras_hub_preset):
    # As in keras-hub: a task names its parts' classes; checkpoints builds them.
    assert GemmaCausalLM.backbone_cls is GemmaBackbone
    assert GemmaCausalLM.preprocessor_cls is GemmaCausalLMPreprocessor
    assert GemmaCausalLMPreprocessor.tokenizer_cls is GemmaTokenizer

    class Tokenizer(GemmaTokenizer):
        pass

    class Preprocessor(GemmaCausalLMPreprocessor):
        tokenizer_cls = Tokenizer

    class Backbone(GemmaBackbone):
        pass

    class CausalLM(GemmaCausalLM):
        backbone_cls = Backbone
        preprocessor_cls = Preprocessor

    directory = keras_hub_preset[0]
    model = CausalLM.from_preset(directory, load_weights=False)
    assert type(model) is CausalLM and type(model.backbone) is Backbone
    assert type(model.preprocessor) is Preprocessor
    assert type(model.preprocessor.tokenizer) is Tokenizer
    assert type(Backbone.from_preset(directory, load_weights=False)) is Backbone
    assert type(Preprocessor.from_preset(directory).tokenizer) is Tokenizer
    assert type(Tokenizer.from_preset(directory)) is Tokenizer


def test_instruction_tuned_models_stop_at_end_of_turn_by_default(keras_hub_preset):
    model = GemmaCausalLM.from_preset(keras_hub_preset[0])
    tokenizer = model.preprocessor.tokenizer
    assert tokenizer.end_of_turn_id is not None
    expected = {tokenizer.end_token_id, tokenizer.end_of_turn_id}
    assert set(model.resolve_stop_token_ids("auto")) == expected


# Atomic saves.


def test_interrupted_save_leaves_previous_preset_intact(tmp_path, tokenizer, monkeypatch):
    from keras_gemma.checkpoints import _keras_layout

    model = GemmaCausalLM(make_backbone("mqa", seed=8), GemmaCausalLMPreprocessor(tokenizer, 16))
    target = tmp_path / "preset"
    model.save_to_preset(target)
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    # Weights are written, then the save dies before the tokenizer.
    monkeypatch.setattr(_keras_layout, "write_preprocessor", fail)
    other = GemmaCausalLM(make_backbone("mqa", seed=9), GemmaCausalLMPreprocessor(tokenizer, 16))
    with pytest.raises(OSError, match="disk full"):
        other.save_to_preset(target)
    after = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preset"]  # no temporary left
    monkeypatch.undo()
    other.save_to_preset(target)  # a complete save replaces it
    assert_same_logits(GemmaCausalLM.from_preset(target)(INPUTS), other(INPUTS))


def test_save_refuses_to_replace_a_directory_that_is_not_a_preset(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a preset"):
        make_backbone().save_to_preset(tmp_path)


# Failures.


def test_unknown_preset_name_lists_close_matches():
    with pytest.raises(ValueError, match="gemma_2b_en"):
        GemmaCausalLM.from_preset("gemma_2b_enn")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GemmaBackbone.from_preset("./no/such/preset")


def test_kaggle_without_kagglehub_names_handle_and_local_copy(monkeypatch):
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # import fails
    with pytest.raises(PresetDownloadError) as error:
        GemmaCausalLM.from_preset("gemma_2b_en")
    message = str(error.value)
    assert "kaggle://keras/gemma/keras/gemma_2b_en/3" in message
    assert "pip install kagglehub" in message and "local copy" in message


def test_kaggle_and_hf_without_network_name_handle_and_local_copy(monkeypatch):
    kagglehub = pytest.importorskip("kagglehub")
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(*args, **kwargs):
        raise ConnectionError("Network is unreachable")

    monkeypatch.setattr(kagglehub, "model_download", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(PresetDownloadError, match="unreachable") as error:
        GemmaBackbone.from_preset("kaggle://keras/gemma/keras/gemma_instruct_2b_en/3")
    assert "kaggle://keras/gemma/keras/gemma_instruct_2b_en/3" in str(error.value)
    assert "from_preset('/path/to/dir')" in str(error.value)
    with pytest.raises(PresetDownloadError, match="hf://google/gemma-2b") as error:
        GemmaTokenizer.from_preset("hf://google/gemma-2b")
    assert "gated" in str(error.value)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(PresetDownloadError, match="pip install huggingface_hub"):
        GemmaTokenizer.from_preset("hf://google/gemma-2b")


def test_missing_files(tmp_path, keras_hub_preset, huggingface_checkpoint):
    keras_copy = copy_preset(keras_hub_preset[0], tmp_path, "keras")
    (keras_copy / "model.weights.h5").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.weights\.h5"):
        GemmaCausalLM.from_preset(keras_copy)
    GemmaCausalLM.from_preset(keras_copy, load_weights=False)  # weights are optional then
    (keras_copy / "assets/tokenizer/vocabulary.spm").unlink()
    with pytest.raises(FileNotFoundError, match="vocabulary.spm"):
        GemmaCausalLM.from_preset(keras_copy, load_weights=False)
    (keras_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        GemmaBackbone.from_preset(keras_copy)
    hf_copy = copy_preset(huggingface_checkpoint[0], tmp_path, "hf")
    (hf_copy / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        GemmaCausalLM.from_preset(hf_copy)


def test_truncated_and_corrupt_weights(tmp_path, keras_hub_preset, huggingface_checkpoint):
    keras_copy = copy_preset(keras_hub_preset[0], tmp_path, "keras")
    weights = keras_copy / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        GemmaBackbone.from_preset(keras_copy)
    weights.write_bytes(b"\x00not hdf5" * 100)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        GemmaBackbone.from_preset(keras_copy)

    hf_copy = copy_preset(huggingface_checkpoint[0], tmp_path, "hf")
    weights = hf_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        GemmaBackbone.from_preset(hf_copy)
    weights.write_bytes(data[:8] + b"{garbage" + data[16:])
    with pytest.raises(CheckpointError, match="corrupt"):
        GemmaBackbone.from_preset(hf_copy)


def test_config_that_does_not_match_the_weights(tmp_path, keras_hub_preset, huggingface_checkpoint):
    keras_copy = copy_preset(keras_hub_preset[0], tmp_path, "keras")
    config = json.loads((keras_copy / "config.json").read_text())
    config["config"]["hidden_dim"] = 48
    (keras_copy / "config.json").write_text(json.dumps(config))
    expected = r"token_embedding/embeddings.*\(384, 32\).*\(384, 48\)"
    with pytest.raises(CheckpointError, match=expected):
        GemmaBackbone.from_preset(keras_copy)

    hf_copy = copy_preset(huggingface_checkpoint[0], tmp_path, "hf")
    config = json.loads((hf_copy / "config.json").read_text())
    config["num_key_value_heads"] = 4
    (hf_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="k_proj"):
        GemmaCausalLM.from_preset(hf_copy)


def test_tokenizer_that_does_not_match_the_config(tmp_path, keras_hub_preset):
    keras_copy = copy_preset(keras_hub_preset[0], tmp_path, "keras")
    other = train_sentencepiece(["a different, smaller vocabulary"] * 20, 300)
    (keras_copy / "assets/tokenizer/vocabulary.spm").write_bytes(other)
    with pytest.raises(CheckpointError, match="300 pieces.*vocabulary_size=384"):
        GemmaCausalLM.from_preset(keras_copy)
    with pytest.raises(CheckpointError, match="300 pieces"):
        GemmaTokenizer.from_preset(keras_copy)


def test_pickled_weights_are_never_loaded(tmp_path, huggingface_checkpoint):
    hf_copy = copy_preset(huggingface_checkpoint[0], tmp_path, "hf")
    (hf_copy / "model.safetensors").unlink()
    (hf_copy / "pytorch_model.bin").write_bytes(b"a pickle would run code")
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        GemmaBackbone.from_preset(hf_copy)


def test_gemma_2_preset_is_refused(tmp_path, keras_hub_preset):
    keras_copy = copy_preset(keras_hub_preset[0], tmp_path, "keras")
    config = json.loads((keras_copy / "config.json").read_text())
    config["config"]["use_post_ffw_norm"] = True
    (keras_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a Gemma 1 preset"):
        GemmaBackbone.from_preset(keras_copy)


def test_presets_load_in_the_dtype_they_were_saved_in(tmp_path):
    backbone = make_backbone("mqa", dtype="bfloat16")
    backbone.save_to_preset(tmp_path / "bf16")
    same = GemmaBackbone.from_preset(tmp_path / "bf16")
    assert same.dtype_policy.name == "bfloat16"
    loaded = GemmaBackbone.from_preset(tmp_path / "bf16", dtype="float32")
    assert loaded.dtype_policy.name == "float32"
    # The values survive: bit for bit in bfloat16, and exactly widened in float32.
    saved = {v.path: to_numpy(keras.ops.cast(v, "float32")) for v in backbone.weights}
    for model, dtype in [(same, "bfloat16"), (loaded, "float32")]:
        assert {v.path for v in model.weights} == set(saved)
        for variable in model.weights:
            assert keras.backend.standardize_dtype(variable.dtype) == dtype
            value = to_numpy(keras.ops.cast(variable, "float32"))
            np.testing.assert_array_equal(value, saved[variable.path], err_msg=variable.path)
