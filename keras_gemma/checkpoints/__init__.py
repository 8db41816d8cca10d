"""Loading and saving Gemma presets in the Keras (Kaggle) and Hugging Face layouts.

`from_preset` / `save_to_preset` on the model classes call these. As in
keras-hub, the loaders take the class to build (`load_backbone(cls, ...)`);
a task class names the classes of its parts (`GemmaCausalLM.backbone_cls`,
`.preprocessor_cls`, `GemmaCausalLMPreprocessor.tokenizer_cls`), so this
package imports none of the model modules. A preset is a name from
`keras_gemma.presets.PRESETS`, `kaggle://...`, `hf://...` or a local
directory in either layout, detected from its `config.json`.

Loading checks every tensor's shape against `GemmaConfig.weight_shapes()`
before any weight is read, checks the tokenizer against the config's
vocabulary size, then reads tensors one at a time into the model's
variables, so a failure never returns a half-loaded model and memory stays
near one copy of the weights. Only JSON, H5 and safetensors are read:
nothing is unpickled or executed.

Example:
>>> import tempfile
>>> from keras_gemma import GemmaBackbone, checkpoints
>>> backbone = GemmaBackbone(vocabulary_size=100, num_layers=1,
...     num_query_heads=2, num_key_value_heads=1, hidden_dim=16,
...     intermediate_dim=32, head_dim=8)
>>> directory = tempfile.mkdtemp() + "/preset"
>>> checkpoints.save_backbone(backbone, directory)
>>> checkpoints.detect_layout(directory)
'keras'
>>> checkpoints.load_backbone(GemmaBackbone, directory).config == backbone.config
True
"""

import functools
import pathlib

from keras_gemma.checkpoints import _hf_layout
from keras_gemma.checkpoints import _keras_layout
from keras_gemma.checkpoints._io import CheckpointError
from keras_gemma.checkpoints._io import SafetensorsFile
from keras_gemma.checkpoints._io import atomic_directory
from keras_gemma.checkpoints._io import atomic_file
from keras_gemma.checkpoints._io import build_with_weights
from keras_gemma.checkpoints._io import read_json
from keras_gemma.checkpoints._io import save_arrays
from keras_gemma.checkpoints._resolve import PresetDownloadError
from keras_gemma.checkpoints._resolve import resolve_preset

__all__ = [
    "CheckpointError",
    "PresetDownloadError",
    "SafetensorsFile",
    "atomic_directory",
    "atomic_file",
    "build_with_weights",
    "detect_layout",
    "export_huggingface",
    "load_backbone",
    "load_causal_lm",
    "load_preprocessor",
    "load_tokenizer",
    "read_config",
    "resolve_preset",
    "save_arrays",
    "save_backbone",
    "save_causal_lm",
    "save_preprocessor",
    "save_tokenizer",
]


def detect_layout(directory):
    """`"keras"` or `"huggingface"`, from the directory's `config.json`."""
    directory = pathlib.Path(directory)
    if not (directory / "config.json").is_file():
        if (directory / _keras_layout.TOKENIZER_FILE).is_file():
            return "keras"  # a tokenizer-only Keras preset
        raise FileNotFoundError(
            f"Missing file 'config.json' in {directory}: not a Keras preset (config.json, "
            "model.weights.h5, tokenizer.json, assets/tokenizer/vocabulary.spm) or a Hugging "
            "Face Gemma checkpoint (config.json, model.safetensors, tokenizer.model)."
        )
    config = read_json(directory / "config.json")
    if _keras_layout.is_keras_layout(config):
        return "keras"
    if _hf_layout.is_huggingface_layout(config):
        return "huggingface"
    raise CheckpointError(
        f"{directory}/config.json is neither a keras-hub serialized backbone nor a Hugging "
        "Face config with `model_type`."
    )


def _layout_module(directory):
    return _keras_layout if detect_layout(directory) == "keras" else _hf_layout


def read_config(preset):
    """`(directory, GemmaConfig, saved dtype)` of a preset."""
    directory = resolve_preset(preset)
    config, dtype = _layout_module(directory).read_config(directory)
    return directory, config, dtype


_SAVED_DTYPES = ("float32", "bfloat16", "float16", "mixed_bfloat16", "mixed_float16")


def _backbone_from(cls, directory, config, saved_dtype, load_weights, dtype, **kwargs):
    """`cls` in `dtype`, else in the dtype the preset was saved in (as
    keras-hub does: Gemma's published presets are bfloat16)."""
    layout = _layout_module(directory)
    quantization_mode = layout.read_quantization_mode(directory)
    if dtype is None and saved_dtype in _SAVED_DTYPES:
        dtype = saved_dtype
    arguments = {**config.to_dict(), **kwargs}
    if dtype is not None:
        arguments["dtype"] = dtype
    if quantization_mode:
        arguments["quantization_mode"] = quantization_mode
    build = functools.partial(cls, **arguments)
    if not load_weights:
        return build()
    loaders, close = layout.weight_loaders(directory, config, quantization_mode)
    try:
        return build_with_weights(build, loaders)
    finally:
        close()


def load_backbone(cls, preset, load_weights=True, dtype=None, **kwargs):
    """A `cls` (`GemmaBackbone`) from a preset; see `GemmaBackbone.from_preset`.

    `cls` is called with the config's arguments, `dtype`, `quantization_mode`
    for a quantized Keras preset, and `kwargs`.
    """
    directory, config, saved_dtype = read_config(preset)
    return _backbone_from(cls, directory, config, saved_dtype, load_weights, dtype, **kwargs)


def _tokenizer_from(cls, directory, vocabulary_size=None):
    directory = pathlib.Path(directory)
    path = directory / _layout_module(directory).VOCABULARY_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"Missing tokenizer file {str(path.relative_to(directory))!r} in {directory}."
        )
    tokenizer = cls(path)
    if vocabulary_size is not None and tokenizer.vocabulary_size() != vocabulary_size:
        raise CheckpointError(
            f"The tokenizer in {directory} has {tokenizer.vocabulary_size()} pieces but the "
            f"model config has vocabulary_size={vocabulary_size}; they are from different "
            "models."
        )
    return tokenizer


def load_tokenizer(cls, preset):
    """A `cls` (`GemmaTokenizer`) from a preset, called with the path of its
    SentencePiece file, and checked against the preset's config if it has one."""
    directory = resolve_preset(preset)
    vocabulary_size = None
    if (directory / "config.json").is_file():
        vocabulary_size = _layout_module(directory).read_config(directory)[0].vocabulary_size
    return _tokenizer_from(cls, directory, vocabulary_size)


def _preprocessor_from(cls, directory, tokenizer, sequence_length=None, **kwargs):
    if sequence_length is None and detect_layout(directory) == "keras":
        sequence_length = _keras_layout.read_sequence_length(directory)
    if sequence_length is not None:
        kwargs["sequence_length"] = sequence_length
    return cls(tokenizer, **kwargs)


def load_preprocessor(cls, preset, sequence_length=None, load_weights=None, dtype=None, **kwargs):
    """A `cls` (`GemmaCausalLMPreprocessor`) from a preset, with a
    `cls.tokenizer_cls` tokenizer; `kwargs` go to `cls` (`load_weights` and
    `dtype`, which `from_preset` passes every class, do not apply)."""
    directory = resolve_preset(preset)
    tokenizer = load_tokenizer(cls.tokenizer_cls, directory)
    return _preprocessor_from(cls, directory, tokenizer, sequence_length, **kwargs)


def load_causal_lm(cls, preset, load_weights=True, dtype=None, sequence_length=None, **kwargs):
    """A `cls` (`GemmaCausalLM`) with its preprocessor; see `GemmaCausalLM.from_preset`.

    Builds `cls(backbone, preprocessor)` from a `cls.backbone_cls` and a
    `cls.preprocessor_cls` (with its `tokenizer_cls`); `kwargs` go to the
    backbone.
    """
    directory, config, saved_dtype = read_config(preset)
    preprocessor_cls = cls.preprocessor_cls
    # Tokenizer first: a mismatch fails before gigabytes of weights are read.
    tokenizer = _tokenizer_from(preprocessor_cls.tokenizer_cls, directory, config.vocabulary_size)
    preprocessor = _preprocessor_from(preprocessor_cls, directory, tokenizer, sequence_length)
    found = (directory, config, saved_dtype, load_weights, dtype)
    return cls(_backbone_from(cls.backbone_cls, *found, **kwargs), preprocessor)


# Saving. Every save writes a complete directory next to the target and
# renames it into place.


def save_backbone(backbone, directory):
    with atomic_directory(directory) as temporary:
        _keras_layout.write_backbone(temporary, backbone)
        _keras_layout.write_metadata(temporary, backbone)


def save_tokenizer(tokenizer, directory):
    with atomic_directory(directory) as temporary:
        _keras_layout.write_tokenizer(temporary, tokenizer)


def save_preprocessor(preprocessor, directory):
    with atomic_directory(directory) as temporary:
        _keras_layout.write_preprocessor(temporary, preprocessor)


def save_causal_lm(causal_lm, directory):
    """Writes the Keras preset layout that keras-hub's `GemmaCausalLM.from_preset` reads."""
    with atomic_directory(directory) as temporary:
        _keras_layout.write_backbone(temporary, causal_lm.backbone)
        if causal_lm.preprocessor is not None:
            _keras_layout.write_preprocessor(temporary, causal_lm.preprocessor)
        _keras_layout.write_task(temporary, causal_lm.backbone, causal_lm.preprocessor)
        _keras_layout.write_metadata(temporary, causal_lm.backbone, tasks=["CausalLM"])


def export_huggingface(model, directory, tokenizer=None):
    """Writes a Hugging Face Gemma checkpoint (safetensors, config, tokenizer.model).

    `model` is a `GemmaCausalLM` (its preprocessor's tokenizer is written) or
    a `GemmaBackbone` (pass `tokenizer` to include one). The result loads in
    `transformers.GemmaForCausalLM.from_pretrained`.
    """
    backbone = getattr(model, "backbone", model)
    if backbone.get_config().get("quantization_mode"):
        raise ValueError(
            "This model is quantized; Hugging Face Gemma checkpoints hold float weights. "
            "Export the model before `quantize()`, or save it with `save_to_preset`."
        )
    if tokenizer is None and getattr(model, "preprocessor", None) is not None:
        tokenizer = model.preprocessor.tokenizer
    with atomic_directory(directory) as temporary:
        _hf_layout.write(temporary, backbone, tokenizer)
