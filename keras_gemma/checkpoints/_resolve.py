"""Turns a preset argument (name, `kaggle://`, `hf://`, directory) into a local directory."""

import importlib
import os
import pathlib

from keras_gemma.presets import PRESETS
from keras_gemma.presets import get_preset
from keras_gemma.presets import shipped_preset

KAGGLE_PREFIX = "kaggle://"
HF_PREFIX = "hf://"

# What a Hugging Face download fetches: weights as safetensors only (never
# pickled `.bin`/`.pt` files), configs and the SentencePiece model.
_HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]


class PresetDownloadError(ConnectionError):
    """A remote preset could not be fetched (no network, gated, unknown)."""


# Prefix -> (site, package, how to get access).
_SOURCES = {
    KAGGLE_PREFIX: ("Kaggle", "kagglehub", "kaggle.com and set KAGGLE_USERNAME/KAGGLE_KEY"),
    HF_PREFIX: (
        "Hugging Face",
        "huggingface_hub",
        "huggingface.co and log in (`huggingface-cli login` or HF_TOKEN)",
    ),
}


def _download(prefix, handle):
    site, package, access = _SOURCES[prefix]
    hint = (
        f"To use a local copy instead, download {prefix + handle!r} on a machine with network "
        "access (e.g. `kagglehub.model_download(...)` or `huggingface-cli download ...`) "
        "and pass its directory: `from_preset('/path/to/dir')`."
    )
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise PresetDownloadError(
            f"Loading {prefix}{handle} needs the `{package}` package, which is not "
            f"installed (`pip install {package}`). {hint}"
        ) from None
    try:
        if prefix == KAGGLE_PREFIX:
            return module.model_download(handle)
        return module.snapshot_download(handle, allow_patterns=_HF_PATTERNS)
    except Exception as error:
        raise PresetDownloadError(
            f"Could not download {prefix}{handle} from {site} ({type(error).__name__}: "
            f"{error}). Gemma is gated: accept its license on {access}, and check the "
            f"network. {hint}"
        ) from error


def resolve_preset(preset):
    """The local directory holding `preset`, downloading it if needed.

    Args:
        preset: a preset name from `PRESETS` (fetched from its Kaggle handle),
            a preset shipped in the package (`presets.shipped_preset`),
            `kaggle://owner/model/keras/variation[/version]`, `hf://owner/repo`,
            or a local directory.
    """
    if isinstance(preset, os.PathLike):
        preset = os.fspath(preset)
    if not isinstance(preset, str) or not preset:
        raise TypeError(
            "`preset` must be a preset name, 'kaggle://...', 'hf://...' or a directory path. "
            f"Received: {preset!r}"
        )
    if preset in PRESETS:
        preset = PRESETS[preset]["kaggle_handle"]
    elif shipped_preset(preset) is not None:
        return pathlib.Path(str(shipped_preset(preset)))
    for prefix in _SOURCES:
        if preset.startswith(prefix):
            return pathlib.Path(_download(prefix, preset[len(prefix) :]))
    path = pathlib.Path(preset).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(
            f"Preset {preset!r} is a file; pass the directory that holds the preset."
        )
    if os.sep in preset or "/" in preset or preset.startswith("."):
        raise FileNotFoundError(f"Preset directory {preset!r} does not exist.")
    get_preset(preset)  # raises, listing close matches
