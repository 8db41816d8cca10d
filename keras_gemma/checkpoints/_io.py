"""File-level pieces shared by both checkpoint layouts.

Atomic directory writes, a streaming safetensors reader and writer (plain
NumPy: one tensor in memory at a time, bfloat16 included, never a pickle),
and building a backbone straight from per-tensor loaders.
"""

import contextlib
import json
import os
import pathlib
import shutil
import struct
import tempfile
import uuid

import keras
import ml_dtypes
import numpy as np

from keras_gemma import internals


class CheckpointError(ValueError):
    """A preset or checkpoint that cannot be loaded as it is: corrupt,
    truncated, or not matching its config."""


def read_json(path):
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Missing file {path.name!r} in the preset directory {path.parent}."
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None


def write_json(path, data):
    pathlib.Path(path).write_text(json.dumps(data, indent=4) + "\n", encoding="utf-8")


def check_shape(name, expected, found, source):
    if tuple(expected) != tuple(found):
        raise CheckpointError(
            f"Weight {name!r} in {source} has shape {tuple(found)}, but the config expects "
            f"{tuple(expected)}. The config and the weights are from different models."
        )


# Atomic saves.


@contextlib.contextmanager
def atomic_directory(target):
    """Yields a temporary directory that replaces `target` once the block succeeds.

    The temporary directory sits next to `target` (same filesystem, so the
    final step is a rename). If the block raises, it is deleted and a
    previous `target` is untouched. Replacing an existing preset takes two
    renames; should the process die between them, the old preset survives
    as `.<name>.old-*` beside it, never a mix of old and new files.
    """
    target = pathlib.Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(
            f"Cannot save a preset to {target}: it exists and is not a directory."
        )
    if target.is_dir() and any(target.iterdir()) and not (target / "config.json").exists():
        raise FileExistsError(
            f"Cannot save a preset to {target}: it is a non-empty directory that is not a "
            "preset, and saving replaces the whole directory. Choose a new or empty directory."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, backup)
        try:
            os.rename(temporary, target)
        except BaseException:
            os.rename(backup, target)
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.rename(temporary, target)


@contextlib.contextmanager
def atomic_file(target):
    """Yields a temporary path that replaces the file `target` once the block succeeds."""
    target = pathlib.Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(handle)
    try:
        yield pathlib.Path(temporary)
        os.replace(temporary, target)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise


# Safetensors, read and written with NumPy so bfloat16 works and files are
# streamed one tensor at a time. Format: 8-byte little-endian header length,
# a JSON header `{name: {dtype, shape, data_offsets}}`, then the raw data.

_SAFETENSORS_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_SAFETENSORS_NAMES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}


class SafetensorsFile:
    """Lazily reads tensors from one `.safetensors` file.

    The header is parsed and checked against the file size when opened, so
    a truncated file fails before anything is loaded.
    """

    def __init__(self, path):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"Missing weights file {self.path}.")
        size = self.path.stat().st_size
        with open(self.path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{self.path} is truncated or not a safetensors file.")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > min(size - 8, 100_000_000):
                raise CheckpointError(
                    f"{self.path} is truncated or corrupt: its header claims "
                    f"{header_size} bytes but the file has {size}."
                )
            try:
                header = json.loads(file.read(header_size))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise CheckpointError(f"{self.path} has a corrupt safetensors header.") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_size
        self.tensors = {}
        for name, info in header.items():
            try:
                dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(
                    f"{self.path}: unsupported or corrupt entry for tensor {name!r}: {info}"
                ) from None
            if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
                raise CheckpointError(f"{self.path}: tensor {name!r} has inconsistent offsets.")
            if self._data_start + end > size:
                raise CheckpointError(
                    f"{self.path} is truncated: tensor {name!r} ends at byte "
                    f"{self._data_start + end} but the file has {size} bytes."
                )
            self.tensors[name] = (dtype, shape, begin)

    def shape(self, name):
        return self.tensors[name][1]

    def read(self, name):
        dtype, shape, begin = self.tensors[name]
        count = int(np.prod(shape, dtype=np.int64))
        with open(self.path, "rb") as file:
            file.seek(self._data_start + begin)
            array = np.fromfile(file, dtype=dtype, count=count)
        if array.size != count:
            raise CheckpointError(f"{self.path} is truncated inside tensor {name!r}.")
        return array.reshape(shape)


def save_arrays(path, arrays, metadata=None):
    """Atomically writes `{name: array}` as a safetensors file."""
    entries = [(k, v.shape, v.dtype, lambda v=v: v) for k, v in arrays.items()]
    with atomic_file(path) as temporary:
        write_safetensors(temporary, entries, metadata)


def write_safetensors(path, tensors, metadata=None):
    """Writes `[(name, shape, dtype, get_array)]` one tensor at a time."""
    header, offset = {}, 0
    for name, shape, dtype, _ in tensors:
        dtype = np.dtype(dtype)
        nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for name, shape, dtype, get_array in tensors:
            array = np.ascontiguousarray(get_array(), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"Tensor {name!r}: shape {array.shape}, expected {shape}.")
            file.write(memoryview(array.reshape(-1).view(np.uint8)))
            del array


# Building a backbone from per-tensor loaders.


def build_with_weights(build, loaders):
    """Builds a model whose variables take their first value from `loaders`.

    `loaders` maps variable paths to zero-argument functions returning a
    NumPy array (one tensor is read at a time). Variables are created
    uninitialized inside a `StatelessScope` and each is then initialized
    straight from its loader, so no random initial values are allocated
    and peak memory is the model plus one tensor. Where Keras cannot
    initialize them one at a time, each is assigned instead.
    """
    with keras.StatelessScope(initialize_variables=False):
        model = build()
    variables = model.weights
    deferred = internals.supports_deferred_initialization(variables)
    paths = {v.path for v in variables}
    if paths != set(loaders):
        missing, extra = sorted(paths - set(loaders)), sorted(set(loaders) - paths)
        raise CheckpointError(f"Weights do not match the model: missing {missing}, extra {extra}.")
    if not deferred:
        for variable in _with_progress(variables):
            variable.assign(_cast(loaders[variable.path](), variable.dtype))
        return model
    try:
        for variable in _with_progress(variables):
            load = loaders[variable.path]
            internals.initialize_deferred(
                variable, lambda shape, dtype, load=load: _cast(load(), dtype)
            )
    finally:
        internals.forget_uninitialized_variables(variables)
    return model


# Loads above this size show a progress bar (a 2B model takes tens of seconds).
_PROGRESS_BYTES = 2**28


def _with_progress(variables):
    total = sum(int(np.prod(v.shape)) for v in variables) * 2
    if total < _PROGRESS_BYTES:
        yield from variables
        return
    bar = keras.utils.Progbar(len(variables), unit_name="tensor")
    for i, variable in enumerate(variables):
        yield variable
        bar.update(i + 1)


def numpy_dtype(name):
    """The NumPy dtype of a Keras dtype name (bfloat16 from `ml_dtypes`)."""
    return np.dtype(ml_dtypes.bfloat16 if str(name) == "bfloat16" else name)


def _cast(array, dtype):
    return array.astype(numpy_dtype(dtype), copy=False)
