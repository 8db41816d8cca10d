"""Hugging Face's Gemma checkpoint layout, read and written.

    config.json                    `model_type: gemma`
    model.safetensors              or model.safetensors.index.json + shards
    tokenizer.model                the SentencePiece model

Tensor names and layouts come from `weight_names.huggingface_tensors`.
Only safetensors are read: pickled `pytorch_model.bin` files are refused.
"""

import pathlib

import keras
import numpy as np

from keras_gemma.checkpoints._io import CheckpointError
from keras_gemma.checkpoints._io import SafetensorsFile
from keras_gemma.checkpoints._io import check_shape
from keras_gemma.checkpoints._io import numpy_dtype
from keras_gemma.checkpoints._io import read_json
from keras_gemma.checkpoints._io import write_json
from keras_gemma.checkpoints._io import write_safetensors
from keras_gemma.config import GemmaConfig
from keras_gemma.weight_names import huggingface_config
from keras_gemma.weight_names import huggingface_tensors
from keras_gemma.weight_names import mapped_shape

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
VOCABULARY_FILE = "tokenizer.model"
# Tensors a checkpoint may carry that the tied-embedding model does not use.
_IGNORED = {"lm_head.weight"}


def is_huggingface_layout(config):
    return isinstance(config, dict) and "model_type" in config


def read_config(directory):
    """The `GemmaConfig` and stored dtype of a Hugging Face Gemma checkpoint."""
    data = read_json(pathlib.Path(directory) / CONFIG_FILE)
    if data.get("model_type") != "gemma":
        raise CheckpointError(
            f"{directory}/{CONFIG_FILE} has model_type={data.get('model_type')!r}; keras_gemma "
            "loads Gemma 1 checkpoints (model_type 'gemma')."
        )
    activation = data.get("hidden_activation") or data.get("hidden_act") or "gelu_pytorch_tanh"
    if not str(activation).startswith("gelu"):
        raise CheckpointError(
            f"Unsupported activation {activation!r} in {directory}/{CONFIG_FILE}."
        )
    try:
        config = GemmaConfig(
            vocabulary_size=data["vocab_size"],
            num_layers=data["num_hidden_layers"],
            num_query_heads=data["num_attention_heads"],
            num_key_value_heads=data.get("num_key_value_heads", data["num_attention_heads"]),
            hidden_dim=data["hidden_size"],
            intermediate_dim=2 * data["intermediate_size"],
            head_dim=data.get("head_dim") or data["hidden_size"] // data["num_attention_heads"],
            layer_norm_epsilon=float(data.get("rms_norm_eps", 1e-6)),
        )
    except KeyError as error:
        raise CheckpointError(f"{directory}/{CONFIG_FILE} lacks {error.args[0]!r}.") from None
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"Invalid config in {directory}/{CONFIG_FILE}: {error}") from None
    return config, data.get("torch_dtype") or data.get("dtype")


def read_quantization_mode(directory):
    """None: Hugging Face Gemma checkpoints hold float weights."""
    return None


def _open_weights(directory):
    directory = pathlib.Path(directory)
    if (directory / WEIGHTS_FILE).is_file():
        file = SafetensorsFile(directory / WEIGHTS_FILE)
        return {name: file for name in file.tensors}
    if (directory / WEIGHTS_INDEX_FILE).is_file():
        weight_map = read_json(directory / WEIGHTS_INDEX_FILE).get("weight_map", {})
        shards = {shard: SafetensorsFile(directory / shard) for shard in set(weight_map.values())}
        files = {}
        for name, shard in weight_map.items():
            if name not in shards[shard].tensors:
                raise CheckpointError(
                    f"{shard} lacks tensor {name!r} listed in {WEIGHTS_INDEX_FILE}."
                )
            files[name] = shards[shard]
        return files
    pickled = sorted(p.name for pattern in ("*.bin", "*.pt*") for p in directory.glob(pattern))
    hint = (
        f" It has {pickled}, which are pickles; keras_gemma never unpickles them."
        if pickled
        else ""
    )
    raise FileNotFoundError(
        f"Missing weights in {directory}: expected {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}.{hint} "
        "Convert other formats to safetensors, or pass load_weights=False to build without them."
    )


def weight_loaders(directory, config, quantization_mode=None):
    """Checks every tensor's shape, then returns `{our path: load()}` and a
    closer (nothing to close: each read opens its file)."""
    files = _open_weights(directory)
    table = huggingface_tensors(config)
    expected_shapes = config.weight_shapes()
    unexpected = set(files) - {name for name, _, _ in table.values()} - _IGNORED
    unexpected = {n for n in unexpected if not n.endswith("rotary_emb.inv_freq")}
    if unexpected:
        raise CheckpointError(
            f"{directory} has tensors this Gemma config does not: {sorted(unexpected)[:5]}. "
            "The config and the weights are from different models."
        )
    loaders = {}
    for path, (name, to_hf, from_hf) in table.items():
        if name not in files:
            raise CheckpointError(f"Tensor {name!r} is missing from the weights in {directory}.")
        # The shape the tensor must have on disk, derived without data.
        their_shape = mapped_shape(to_hf, expected_shapes[path])
        check_shape(name, their_shape, files[name].shape(name), directory)
        loaders[path] = lambda f=files[name], n=name, convert=from_hf: convert(f.read(n))
    return loaders, lambda: None


def write(directory, backbone, tokenizer=None):
    """Writes config.json, model.safetensors and tokenizer.model."""
    directory = pathlib.Path(directory)
    config = backbone.config
    dtype = numpy_dtype(backbone.dtype_policy.variable_dtype)
    hf_config = huggingface_config(config)
    hf_config["torch_dtype"] = backbone.dtype_policy.variable_dtype
    write_json(directory / CONFIG_FILE, hf_config)
    variables = {v.path: v for v in backbone.weights}
    shapes = config.weight_shapes()
    tensors = []
    for path, (name, to_hf, _) in huggingface_tensors(config).items():
        shape = mapped_shape(to_hf, shapes[path])

        def get(path=path, to_hf=to_hf):
            return to_hf(np.asarray(keras.ops.convert_to_numpy(variables[path].value)))

        tensors.append((name, shape, dtype, get))
    write_safetensors(directory / WEIGHTS_FILE, tensors)
    if tokenizer is not None:
        (directory / VOCABULARY_FILE).write_bytes(tokenizer.proto)
        write_json(
            directory / "tokenizer_config.json",
            {
                "tokenizer_class": "GemmaTokenizer",
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
            },
        )
