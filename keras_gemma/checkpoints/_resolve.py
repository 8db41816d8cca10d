"""Turns a preset argument (name, `kaggle://`, `hf://`, directory) into a local directory."""

import os
import pathlib

from keras_gemma.presets import PRESETS
from keras_gemma.presets import get_preset

KAGGLE_PREFIX = "kaggle://"
HF_PREFIX = "hf://"

# What a Hugging Face download fetches: weights as safetensors only (never
# pickled `.bin`/`.pt` files), configs and the SentencePiece model.
_HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]


class PresetDownloadError(ConnectionError):
    """A remote preset could not be fetched (no network, gated, unknown)."""


def _local_copy_hint(handle):
    return (
        f"To use a local copy instead, download {handle!r} on a machine with network "
        "access (e.g. `kagglehub.model_download(...)` or `huggingface-cli download ...`) "
        "and pass its directory: `from_preset('/path/to/dir')`."
    )


def _download_kaggle(handle):
    try:
        import kagglehub
    except ImportError:
        raise PresetDownloadError(
            f"Loading {KAGGLE_PREFIX}{handle} needs the `kagglehub` package, which is not "
            f"installed (`pip install kagglehub`). {_local_copy_hint(KAGGLE_PREFIX + handle)}"
        ) from None
    try:
        return kagglehub.model_download(handle)
    except Exception as error:
        raise PresetDownloadError(
            f"Could not download {KAGGLE_PREFIX}{handle} from Kaggle "
            f"({type(error).__name__}: {error}). Gemma is gated: accept its license on "
            "kaggle.com and set KAGGLE_USERNAME/KAGGLE_KEY, and check the network. "
            f"{_local_copy_hint(KAGGLE_PREFIX + handle)}"
        ) from error


def _download_huggingface(repo):
    try:
        import huggingface_hub
    except ImportError:
        raise PresetDownloadError(
            f"Loading {HF_PREFIX}{repo} needs the `huggingface_hub` package, which is not "
            f"installed (`pip install huggingface_hub`). {_local_copy_hint(HF_PREFIX + repo)}"
        ) from None
    try:
        return huggingface_hub.snapshot_download(repo, allow_patterns=_HF_PATTERNS)
    except Exception as error:
        raise PresetDownloadError(
            f"Could not download {HF_PREFIX}{repo} from Hugging Face "
            f"({type(error).__name__}: {error}). Gemma is gated: accept its license on "
            "huggingface.co and log in (`huggingface-cli login` or HF_TOKEN), and check the "
            f"network. {_local_copy_hint(HF_PREFIX + repo)}"
        ) from error


def resolve_preset(preset):
    """The local directory holding `preset`, downloading it if needed.

    Args:
        preset: a preset name from `PRESETS` (fetched from its Kaggle handle),
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
    if preset.startswith(KAGGLE_PREFIX):
        directory = _download_kaggle(preset[len(KAGGLE_PREFIX) :])
    elif preset.startswith(HF_PREFIX):
        directory = _download_huggingface(preset[len(HF_PREFIX) :])
    elif preset in PRESETS:
        directory = _download_kaggle(PRESETS[preset]["kaggle_handle"][len(KAGGLE_PREFIX) :])
    else:
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
    return pathlib.Path(directory)
