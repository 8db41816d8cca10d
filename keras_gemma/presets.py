"""The Gemma 1 presets: names, architectures and where their weights live.

The table itself is data (`keras_gemma/preset_data/gemma.json`, shipped in
the wheel); this module only reads it and answers questions about it.

Example:
>>> from keras_gemma.presets import PRESETS, preset_config
>>> "gemma_2b_en" in PRESETS
True
>>> preset_config("gemma_2b_en").num_parameters() == PRESETS["gemma_2b_en"]["params"]
True
"""

import difflib
import importlib.resources
import json
import types

from keras_gemma.config import GemmaConfig


def _read_table():
    path = importlib.resources.files("keras_gemma") / "preset_data" / "gemma.json"
    table = json.loads(path.read_text(encoding="utf-8"))
    presets = {}
    for name, entry in table["presets"].items():
        entry = dict(entry)
        entry["config"] = types.MappingProxyType(table["architectures"][entry["architecture"]])
        presets[name] = types.MappingProxyType(entry)
    return types.MappingProxyType(presets)


# Read-only `{name: metadata}`; metadata has `architecture`, `config` (the
# `GemmaBackbone` arguments), `description`, `params`, `kaggle_handle`,
# `huggingface_repo` and `instruction_tuned`.
PRESETS = _read_table()


def shipped_preset(name):
    """The packaged directory of a preset trained by this project (e.g.
    `"toy_gemma"`, made by `training/toy_pipeline.py`), or None.

    >>> shipped_preset("toy_gemma").joinpath("config.json").is_file()
    True
    """
    path = importlib.resources.files("keras_gemma") / "preset_data" / str(name)
    return path if path.joinpath("config.json").is_file() else None


def get_preset(name):
    """The metadata of the preset `name`, or a ValueError naming close matches."""
    if name in PRESETS:
        return PRESETS[name]
    close = difflib.get_close_matches(str(name), list(PRESETS), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"Unknown Gemma preset {name!r}.{hint} Known presets: {', '.join(PRESETS)}. "
        "A preset may also be a local directory, 'kaggle://owner/model/keras/variation/version' "
        "or 'hf://owner/repo'."
    )


def preset_config(name):
    """The `GemmaConfig` of the preset `name`."""
    return GemmaConfig(**get_preset(name)["config"])
