"""keras-hub's Keras preset layout, as published on Kaggle, read and written.

    config.json                      serialized keras-hub GemmaBackbone
    model.weights.h5                 or model.weights.json + model_0000N.weights.h5
    tokenizer.json                   serialized keras-hub GemmaTokenizer
    assets/tokenizer/vocabulary.spm  the SentencePiece model
    preprocessor.json, task.json, metadata.json   optional

The weights file is Keras' H5 format. Its groups follow keras-hub's object
graph (attribute names and snake-cased class names, numbered from the
second occurrence), e.g. `layers/gemma_decoder_block_1/attention/query_dense/
vars/0`; `_H5_GROUPS` below maps keras-hub's variable paths onto them. It is
read and written with h5py one dataset at a time; keras-hub is not needed.
"""

import datetime
import pathlib
import re

import keras
import ml_dtypes
import numpy as np

from keras_gemma import internals
from keras_gemma.checkpoints._io import CheckpointError
from keras_gemma.checkpoints._io import check_shape
from keras_gemma.checkpoints._io import read_json
from keras_gemma.checkpoints._io import write_json
from keras_gemma.config import GemmaConfig
from keras_gemma.version import __version__
from keras_gemma.weight_names import keras_hub_path
from keras_gemma.weight_names import keras_hub_tensors
from keras_gemma.weight_names import mapped_shape

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
SHARDED_WEIGHTS_FILE = "model.weights.json"
TOKENIZER_FILE = "tokenizer.json"
PREPROCESSOR_FILE = "preprocessor.json"
TASK_FILE = "task.json"
METADATA_FILE = "metadata.json"
VOCABULARY_FILE = "assets/tokenizer/vocabulary.spm"

_BACKBONE_CLASS = "GemmaBackbone"
# keras-hub's GemmaBackbone serves Gemma 2 too; these are Gemma 1's values.
_GEMMA1_OPTIONS = {
    "query_head_dim_normalize": True,
    "use_post_ffw_norm": False,
    "use_post_attention_norm": False,
    "final_logit_soft_cap": None,
    "attention_logit_soft_cap": None,
    "use_sliding_window_attention": False,
}
# keras-hub layer attribute (inside a decoder block) -> H5 group name.
_H5_GROUPS = {
    "pre_attention_norm": "pre_attention_norm",
    "pre_ffw_norm": "pre_ffw_norm",
    "attention/query": "attention/query_dense",
    "attention/key": "attention/key_dense",
    "attention/value": "attention/value_dense",
    "attention/attention_output": "attention/output_dense",
    "ffw_gating": "gating_ffw",
    "ffw_gating_2": "gating_ffw_2",
    "ffw_linear": "ffw_linear",
}
# Groups keras-hub writes for layers without weights; written too, so the
# file matches keras-hub's own byte for byte in structure.
_EMPTY_BLOCK_GROUPS = {
    "attention/dropout_layer": "dropout",
    "attention/rope_layer": "rotary_embedding",
    "attention/softmax": "softmax",
}


def h5_dataset(path):
    """The H5 dataset of one of our variable paths, e.g.

    >>> h5_dataset("decoder_block_1/feed_forward/ffw_gating/kernel")
    'layers/gemma_decoder_block_1/gating_ffw/vars/0'
    """
    theirs, leaf = keras_hub_path(path).rsplit("/", 1)
    # An int8 layer's scale follows its kernel, as Keras orders the variables.
    index = 1 if leaf in ("kernel_scale", "embeddings_scale") else 0
    if theirs == "token_embedding":
        return f"layers/reversible_embedding/vars/{index}"
    if theirs == "final_normalization":
        return "layers/rms_normalization/vars/0"
    match = re.fullmatch(r"decoder_block_(\d+)/(.+)", theirs)
    if not match or match.group(2) not in _H5_GROUPS:
        raise KeyError(f"No keras-hub H5 location for variable {path!r}.")
    return f"{_block_group(int(match.group(1)))}/{_H5_GROUPS[match.group(2)]}/vars/{index}"


def _block_group(index):
    return "layers/gemma_decoder_block" + (f"_{index}" if index else "")


def is_keras_layout(config):
    return isinstance(config, dict) and "class_name" in config and "config" in config


def read_config(directory):
    """The `GemmaConfig` and saved dtype of a Keras-layout preset."""
    data = read_json(pathlib.Path(directory) / CONFIG_FILE)
    if data.get("class_name") != _BACKBONE_CLASS:
        raise CheckpointError(
            f"{directory}/{CONFIG_FILE} describes a {data.get('class_name')!r}, not a Gemma "
            f"backbone ({_BACKBONE_CLASS!r})."
        )
    config = data["config"]
    for option, value in _GEMMA1_OPTIONS.items():
        if option in config and config[option] != value:
            raise CheckpointError(
                f"{directory} is not a Gemma 1 preset: {option}={config[option]!r} (Gemma 1 "
                f"uses {value!r}). Gemma 2 checkpoints are not supported by keras_gemma."
            )
    fields = GemmaConfig.__dataclass_fields__
    try:
        gemma_config = GemmaConfig(**{k: v for k, v in config.items() if k in fields})
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"Invalid config in {directory}/{CONFIG_FILE}: {error}") from None
    dtype = config.get("dtype")
    if isinstance(dtype, dict):
        dtype = dtype.get("config", {}).get("name")
    return gemma_config, dtype


def read_quantization_mode(directory):
    """`"int8"` for a preset saved from a quantized model, else None.

    A keras_gemma extension of the config: keras-hub does not read it.
    """
    data = read_json(pathlib.Path(directory) / CONFIG_FILE)
    return data["config"].get("quantization_mode")


def read_sequence_length(directory):
    """The preprocessor's saved `sequence_length`, or None."""
    directory = pathlib.Path(directory)
    for name in (PREPROCESSOR_FILE, TASK_FILE):
        if (directory / name).is_file():
            config = read_json(directory / name).get("config") or {}
            if name == TASK_FILE:
                config = (config.get("preprocessor") or {}).get("config") or {}
            if config.get("sequence_length"):
                return int(config["sequence_length"])
    return None


class _H5Weights:
    """Datasets of a single or sharded Keras weights file, opened lazily."""

    def __init__(self, directory):
        import h5py

        directory = pathlib.Path(directory)
        if (directory / WEIGHTS_FILE).is_file():
            names = [WEIGHTS_FILE]
        elif (directory / SHARDED_WEIGHTS_FILE).is_file():
            weight_map = read_json(directory / SHARDED_WEIGHTS_FILE).get("weight_map", {})
            listed = [v if isinstance(v, list) else [v] for v in weight_map.values()]
            names = list(dict.fromkeys(name for group in listed for name in group))
        else:
            raise FileNotFoundError(
                f"Missing weights in {directory}: expected {WEIGHTS_FILE} (or sharded "
                f"{SHARDED_WEIGHTS_FILE}). Pass load_weights=False to build without them."
            )
        self.files = []
        for name in names:
            path = directory / name
            if not path.is_file():
                raise FileNotFoundError(f"Missing weights shard {name!r} in {directory}.")
            try:
                self.files.append(h5py.File(path, "r"))
            except OSError as error:
                self.close()
                raise CheckpointError(
                    f"{path} is truncated or corrupt and cannot be opened as HDF5 ({error})."
                ) from None

    def dataset(self, key):
        for file in self.files:
            if key in file:
                return file[key]
        raise CheckpointError(
            f"Weight {key!r} is missing from {[f.filename for f in self.files]}; the file is "
            "not a keras-hub Gemma checkpoint or does not match its config."
        )

    def close(self):
        for file in self.files:
            file.close()


def weight_loaders(directory, config, quantization_mode=None):
    """Checks every weight's shape, then returns `{our path: load()}` and a closer."""
    weights = _H5Weights(directory)
    try:
        loaders = {}
        shapes = config.weight_shapes(quantization_mode)
        tensors = keras_hub_tensors(config, quantization_mode)
        for path, (_, to_theirs, from_theirs) in tensors.items():
            key = h5_dataset(path)
            dataset = weights.dataset(key)
            their_shape = mapped_shape(to_theirs, shapes[path])
            check_shape(path, their_shape, dataset.shape, f"{directory} ({key})")
            loaders[path] = lambda dataset=dataset, key=key, convert=from_theirs: (
                np.ascontiguousarray(convert(_read_dataset(dataset, key)))
            )
    except BaseException:
        weights.close()
        raise
    return loaders, weights.close


def _read_dataset(dataset, key):
    try:
        array = dataset[()]
    except OSError as error:
        raise CheckpointError(
            f"Could not read {key!r} from {dataset.file.filename}: the file is truncated or "
            f"corrupt ({error})."
        ) from None
    if dataset.attrs.get("dtype") == "bfloat16":
        array = array.view(ml_dtypes.bfloat16)
    return array


# Writing.


def _serialized(module, class_name, config):
    return {
        "module": f"keras_hub.src.models.gemma.{module}",
        "class_name": class_name,
        "config": config,
        "registered_name": f"keras_hub>{class_name}",
    }


def _layer(module, class_name, dtype, **config):
    """A serialized keras-hub layer, named after its module as keras-hub names it."""
    policy = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": dtype}}
    config = {
        "name": module,
        "trainable": True,
        "dtype": {**policy, "registered_name": None},
        **config,
    }
    return _serialized(module, class_name, config)


def backbone_json(config, dtype, quantization_mode=None):
    options = {**config.to_dict(), **_GEMMA1_OPTIONS, "sliding_window_size": 4096}
    if quantization_mode:
        options["quantization_mode"] = quantization_mode
    return _layer("gemma_backbone", "GemmaBackbone", dtype, **options)


def _backbone_json(backbone):
    mode = backbone.get_config().get("quantization_mode")
    return backbone_json(backbone.config, backbone.dtype_policy.name, mode)


def tokenizer_json():
    return _layer(
        "gemma_tokenizer",
        "GemmaTokenizer",
        "int32",
        config_file=TOKENIZER_FILE,
        proto=None,
        sequence_length=None,
        add_bos=False,
        add_eos=False,
    )


def preprocessor_json(preprocessor):
    return _layer(
        "gemma_causal_lm_preprocessor",
        "GemmaCausalLMPreprocessor",
        "float32",
        tokenizer=tokenizer_json(),
        config_file=PREPROCESSOR_FILE,
        sequence_length=preprocessor.sequence_length,
        add_start_token=preprocessor.add_start_token,
        add_end_token=preprocessor.add_end_token,
    )


def write_backbone(directory, backbone):
    """Writes config.json, metadata.json and model.weights.h5 for `backbone`."""
    import h5py

    directory = pathlib.Path(directory)
    quantization_mode = backbone.get_config().get("quantization_mode")
    # The layers `quantize()` converts: the projections and the token embedding.
    quantizable = (keras.layers.EinsumDense, keras.layers.Embedding)
    layers = internals.flatten_layers(backbone)
    modes = {layer.quantization_mode for layer in layers if isinstance(layer, quantizable)}
    if modes != {quantization_mode}:
        raise ValueError(
            "save_to_preset needs the embedding and every projection quantized the same "
            f"way; this model mixes {sorted(map(str, modes))}. Quantize them all (the "
            "default filters), or save with `model.save(path.keras)`."
        )
    write_json(directory / CONFIG_FILE, _backbone_json(backbone))
    variables = {v.path: v for v in backbone.weights}
    with h5py.File(directory / WEIGHTS_FILE, "w") as file:
        file.create_group("vars").attrs["name"] = "gemma_backbone"
        for name, attr in (("input_layer", "token_ids"), ("input_layer_1", "padding_mask")):
            file.create_group(f"layers/{name}/vars").attrs["name"] = attr
        for i in range(backbone.config.num_layers):
            block = _block_group(i)
            file.create_group(f"{block}/vars").attrs["name"] = f"decoder_block_{i}"
            file.create_group(f"{block}/attention/vars").attrs["name"] = "attention"
            for group, attr in _EMPTY_BLOCK_GROUPS.items():
                file.create_group(f"{block}/{group}/vars").attrs["name"] = attr
        tensors = keras_hub_tensors(backbone.config, quantization_mode)
        for path, (_, to_theirs, _) in tensors.items():
            key = h5_dataset(path)
            group_name, index = key.rsplit("/", 1)
            group = file.require_group(group_name)
            group.attrs["name"] = keras_hub_path(path).rsplit("/", 2)[-2]
            # One tensor on the host at a time.
            array = np.asarray(keras.ops.convert_to_numpy(variables[path].value))
            array = np.ascontiguousarray(to_theirs(array))
            dataset = group.create_dataset(index, data=array)
            if array.dtype == ml_dtypes.bfloat16:
                dataset.attrs["dtype"] = "bfloat16"
            del array


def write_metadata(directory, backbone, tasks=()):
    write_json(
        pathlib.Path(directory) / METADATA_FILE,
        {
            "keras_version": keras.__version__,
            "keras_gemma_version": __version__,
            "parameter_count": backbone.config.num_parameters(),
            "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
            "tasks": list(tasks),
        },
    )


def write_tokenizer(directory, tokenizer):
    directory = pathlib.Path(directory)
    write_json(directory / TOKENIZER_FILE, tokenizer_json())
    vocabulary = directory / VOCABULARY_FILE
    vocabulary.parent.mkdir(parents=True, exist_ok=True)
    vocabulary.write_bytes(tokenizer.proto)


def write_preprocessor(directory, preprocessor):
    write_tokenizer(directory, preprocessor.tokenizer)
    write_json(pathlib.Path(directory) / PREPROCESSOR_FILE, preprocessor_json(preprocessor))


def write_task(directory, backbone, preprocessor):
    config = {
        "backbone": _backbone_json(backbone),
        "preprocessor": preprocessor_json(preprocessor) if preprocessor is not None else None,
        "name": "gemma_causal_lm",
    }
    write_json(
        pathlib.Path(directory) / TASK_FILE, _serialized("gemma_causal_lm", "GemmaCausalLM", config)
    )
