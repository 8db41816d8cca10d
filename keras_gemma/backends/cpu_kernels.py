"""Decoding's CPU kernels on x86 (`cpu_kernels.c`, AVX2, built with the
system C compiler on first use): products `x @ weight.T` of a few rows (one
per sequence), and one new position's attention (`attend`).

Decoding one token reads every weight once, so its speed is the speed at
which these products stream weights; on CPUs without bfloat16 or VNNI
instructions the stock kernels convert low-precision weights too slowly to
keep up with memory (`benchmarks/cpu_kernels.py --backend torch`; figures in
`benchmarks/RESULTS.md`). `prepare` binds a layer's weights once; one call
computes several products of the same rows in one pass of the threads and
can apply the RMS norm, GeGLU's gating and the residual around them, since
the calls and small PyTorch ops, not the weights, dominate small matrices.

It is optional: without x86-64 Linux, AVX2 and FMA, a working `cc`, or
PyTorch's OpenMP runtime, every function returns None (one warning says
why; `KERAS_GEMMA_NATIVE=0` turns it off silently) and `torch_cpu` uses the
stock kernels. The library is built once per source and flags into
`$KERAS_GEMMA_CACHE` (default `~/.cache/keras_gemma`), renamed into place so
concurrent processes never load a half-written file.

Example:
>>> import torch
>>> from keras_gemma.backends import cpu_kernels
>>> weight, x = torch.randn(64, 32).bfloat16(), torch.randn(1, 32)
>>> y = cpu_kernels.matvec(x, weight)
>>> y is None or torch.allclose(y, x @ weight.float().T, atol=1e-4)
True
"""

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import subprocess
import warnings

import torch

from keras_gemma import internals
from keras_gemma.checkpoints import atomic_file

_SOURCE = pathlib.Path(__file__).with_name("cpu_kernels.c")
_FUNCTIONS = {torch.bfloat16: "matvec_bf16", torch.int8: "matvec_i8", torch.float32: "matvec_f32"}
_ATTEND_FUNCTIONS = {torch.bfloat16: "attend_bf16", torch.float32: "attend_f32"}
# Below this many weight bytes per thread, waking a second thread costs more
# than it saves.
_BYTES_PER_THREAD = 1 << 18
# Past this many rows the products are compute-bound and this kernel stops
# paying: prefill and larger batches keep PyTorch's kernels. The C file takes
# both limits from here (`_flags`), as they are when the library is built.
MAX_ROWS = 16
MAX_MATRICES = 8
# The C signatures, so that ctypes checks each call's count and types: a
# wrong call raises instead of reading garbage as pointers.
_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
_PP, _PL = ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64)
_SIGNATURES = {  # x, bf16, up, norm, eps, count, ws, scales, ys, outs, residual, in, rows, threads
    "matvec": [_P, _I, _P, _P, _F, _I, _PP, _PP, _PP, _PL, _P, _L, _L, _I],
    "attend": [_P] * 5 + [_F, _P, _P] + [_L] * 6 + [_P, _I],
}


def _flags():
    # -ffp-contract=off: `a * b + c * d` rounds twice, as PyTorch's elementwise ops do.
    limits = [f"-DMAX_ROWS={MAX_ROWS}", f"-DMAX_MATRICES={MAX_MATRICES}"]
    return ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", *limits]


@functools.cache
def cpu_flags():
    """The CPU's feature flags, from /proc/cpuinfo (none where it is unreadable)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(next((ln for ln in text.splitlines() if ln.startswith("flags")), "").split())


def _cpu_has_avx2_and_fma():
    x86_linux = platform.system() == "Linux" and platform.machine() == "x86_64"
    return x86_linux and {"avx2", "fma"} <= cpu_flags()


def _build():
    flags = _flags()
    digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    cache = os.environ.get("KERAS_GEMMA_CACHE", pathlib.Path.home() / ".cache" / "keras_gemma")
    library = pathlib.Path(cache) / f"cpu_kernels-{digest}.so"
    if not library.exists():
        with atomic_file(library) as partial:
            compiler = os.environ.get("CC", "cc")
            command = [compiler, *flags, str(_SOURCE), "-o", str(partial)]
            subprocess.run(command, check=True, capture_output=True, timeout=120)
    return ctypes.CDLL(str(library))


def _openmp_runtime(library):
    """The address of `omp_get_max_threads` as `library` resolves it: the
    same for two libraries only where they share one OpenMP runtime."""
    return ctypes.cast(getattr(library, "omp_get_max_threads", None), ctypes.c_void_p).value


def _decline(reason):
    """Warn why the kernel is off (once: `_library` is cached); None."""
    warnings.warn(
        f"keras_gemma's CPU decoding kernel is off: {reason}. Decoding on CPU uses "
        "PyTorch's kernels instead, which are slower for bfloat16 and int8 weights on "
        "CPUs without bfloat16 instructions; set KERAS_GEMMA_NATIVE=0 to silence this.",
        stacklevel=4,
    )


@functools.cache
def _library():
    """The kernels by C name, typed, or None (after one warning saying why)
    where they cannot run here."""
    if os.environ.get("KERAS_GEMMA_NATIVE", "1") == "0":
        return None
    if not _cpu_has_avx2_and_fma():
        return _decline("it needs x86-64 Linux and a CPU with AVX2 and FMA")
    try:
        library = _build()
    except (OSError, subprocess.SubprocessError) as error:
        stderr = getattr(error, "stderr", None)
        if stderr:  # the compiler's own words say what is missing
            error = stderr.decode(errors="replace").strip().splitlines()[-1]
        return _decline(f"it could not be built ({error}); install a C compiler with OpenMP (CC)")
    # A second OpenMP pool's threads would compete with PyTorch's spinning
    # workers: decline unless libgomp.so.1 resolved to PyTorch's own runtime.
    torch_library = ctypes.CDLL(internals.torch_extension_library())
    if _openmp_runtime(library) != _openmp_runtime(torch_library):
        return _decline("its libgomp.so.1 is not the OpenMP runtime this PyTorch build loaded")
    functions = {}
    for name in (*_FUNCTIONS.values(), *_ATTEND_FUNCTIONS.values()):
        signature = _SIGNATURES[name.split("_")[0]]
        # With paramflags ctypes rejects extra arguments too, not only missing ones.
        prototype = ctypes.CFUNCTYPE(ctypes.c_int, *signature)
        functions[name] = prototype((name, library), ((1,),) * len(signature))
    return functions


def _pointers(ctype, values):
    return (ctype * len(values))(*values)


class Products:
    """`x -> [(x @ w.T) * s for w, s in zip(weights, scales)]` in one kernel
    call, for matrices that share their input (a layer's query, key and
    value projections). Build it with `prepare`, once per set of weights, so
    that each call does little Python.

    It keeps the weights alive but reads them at each call, so it computes
    with their current values as long as their storage is not replaced.

    Example:
    >>> import torch
    >>> gate, up = torch.randn(16, 8), torch.randn(16, 8)
    >>> products = prepare([gate, up])  # None where the kernel is not built
    >>> products is None or len(products(torch.randn(2, 8))) == 2
    True
    """

    def __init__(self, function, weights, scales):
        self._function = function
        self._weights = weights
        self._scales = [None if s is None else s.to(torch.float32).contiguous() for s in scales]
        self._in = weights[0].shape[1]
        self._outs = [weight.shape[0] for weight in weights]
        self._weight_pointers = _pointers(ctypes.c_void_p, [w.data_ptr() for w in weights])
        self._scale_pointers = _pointers(
            ctypes.c_void_p, [None if s is None else s.data_ptr() for s in self._scales]
        )
        self._out_sizes = _pointers(ctypes.c_int64, self._outs)
        self._nbytes = sum(weight.nbytes for weight in weights)

    def __call__(self, x, norm=None, epsilon=1e-6, up=None, residual=None):
        """The products for `x` `[rows, in]`, each in `x`'s dtype, or None
        where the kernel does not apply (past `MAX_ROWS` rows, not on CPU).

        Each option saves the PyTorch ops it replaces (together a sizeable
        part of a small model's decode step), rounding as the model's
        layers do:
        - `norm` (`[in]` float32, Gemma's `1 + scale`): the products of the
          RMS-normalized `x`, normalized in float32 and rounded to `x`'s
          dtype as `RMSNormalization` does.
        - `up` (like `x`): the products of GeGLU's `gelu(x) * up`
          (tanh-approximate GELU, to a few float32 ulp of PyTorch's).
        - `residual` (`[rows, out]`, `x`'s dtype; one matrix only):
          `residual + product`.
        """
        if (
            x.device.type != "cpu"
            or x.dim() != 2
            or not 1 <= x.shape[0] <= MAX_ROWS
            or x.shape[1] != self._in
            or (norm is not None and tuple(norm.shape) != (self._in,))
        ):
            return None
        rows, dtype = x.shape[0], x.dtype
        extras = [t for t in (up, residual) if t is not None]
        if extras and (
            dtype not in (torch.float32, torch.bfloat16)
            or any(t.dtype != dtype or t.device.type != "cpu" for t in extras)
            or (up is not None and up.shape != x.shape)
            or (residual is not None and tuple(residual.shape) != (rows, *self._outs))
        ):
            return None
        if norm is not None:
            norm = norm.to(torch.float32).contiguous()
        if dtype not in (torch.float32, torch.bfloat16):
            x = x.to(torch.float32)
        x = x.contiguous()
        up = None if up is None else up.contiguous()
        residual = None if residual is None else residual.contiguous()
        ys = [torch.empty(rows, out, dtype=x.dtype) for out in self._outs]
        threads = max(1, min(torch.get_num_threads(), self._nbytes // _BYTES_PER_THREAD))
        status = self._function(
            x.data_ptr(),
            x.dtype == torch.bfloat16,
            None if up is None else up.data_ptr(),
            None if norm is None else norm.data_ptr(),
            0.0 if norm is None else epsilon,
            len(ys),
            self._weight_pointers,
            self._scale_pointers,
            _pointers(ctypes.c_void_p, [y.data_ptr() for y in ys]),
            self._out_sizes,
            None if residual is None else residual.data_ptr(),
            self._in,
            rows,
            threads,
        )
        if status != 0:  # out of memory
            return None
        return ys if x.dtype == dtype else [y.to(dtype) for y in ys]


def prepare(weights, scales=None):
    """`Products` of contiguous `[out, in]` CPU `weights` (float32, bfloat16
    or int8, all one dtype and `in`; up to `MAX_MATRICES`) and their `[out]`
    `scales` (or None), or None where the kernel cannot serve them."""
    scales = [None] * len(weights) if scales is None else list(scales)
    first = weights[0]
    if (
        first.dtype not in _FUNCTIONS
        or not 1 <= len(weights) <= MAX_MATRICES
        or len(scales) != len(weights)
        or any(
            w.dtype != first.dtype
            or w.dim() != 2
            or w.shape[1] != first.shape[1]
            or w.device.type != "cpu"
            or not w.is_contiguous()
            for w in weights
        )
        or _library() is None
    ):
        return None
    return Products(_library()[_FUNCTIONS[first.dtype]], list(weights), scales)


def matvec(x, weight, scale=None):
    """`(x @ weight.T) * scale` for `x` `[rows, in]` (up to `MAX_ROWS`) and a contiguous
    `[out, in]` `weight` (float32, bfloat16 or int8) on CPU, accumulated in
    float32 and returned in `x`'s dtype; `scale` is `[out]` or None.
    Returns None where the kernel does not apply, so callers fall back."""
    products = prepare([weight], [scale])
    ys = None if products is None else products(x)
    return None if ys is None else ys[0]


# Multiply-adds of attention below which a second thread costs more than it
# saves.
_ATTENTION_WORK_PER_THREAD = 1 << 17


def attend(query, key, value, cos, sin, scale, key_cache, value_cache, position):
    """One new position's attention for decoding, in one call (`attend_*` in
    the C file): rotates `query` `[rows, heads * h]` and `key` `[rows,
    kv_heads * h]` by `cos`/`sin` (`[h]` float32: the position's [cos, cos]
    and [-sin, sin]), writes key and `value` into the caches `[rows,
    max_length, kv_heads, h]` at `position`, and returns the `[rows, heads *
    h]` attention of the `scale`d queries to cache slots `0...position`.
    Rounds where the model does, in the inputs' dtype. Returns None where it
    does not apply (not CPU, dtypes other than one float32 or bfloat16, a
    non-contiguous cache), before touching the caches, or out of memory."""
    dtype = query.dtype
    rows, max_length, kv_heads, h = key_cache.shape
    tensors = (query, key, value, key_cache, value_cache)
    if (
        dtype not in _ATTEND_FUNCTIONS
        or any(t.dtype != dtype or t.device.type != "cpu" for t in tensors)
        or not (key_cache.is_contiguous() and value_cache.is_contiguous())
        or value_cache.shape != key_cache.shape
        or tuple(key.shape) != (rows, kv_heads * h)
        or key.shape != value.shape
        or query.dim() != 2
        or query.shape[0] != rows
        or query.shape[1] % (kv_heads * h)
        or not 0 <= position < max_length
        or h % 2
        or tuple(cos.shape) != (h,)
        or tuple(sin.shape) != (h,)
        or _library() is None
    ):
        return None
    heads = query.shape[1] // h
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    out = torch.empty_like(query)
    work = rows * heads * (position + 1) * h
    threads = max(1, min(torch.get_num_threads(), work // _ATTENTION_WORK_PER_THREAD))
    inputs = [t.data_ptr() for t in (query, key, value, cos, sin)]
    caches = (key_cache.data_ptr(), value_cache.data_ptr())
    sizes = (rows, max_length, position, heads, kv_heads, h)
    function = _library()[_ATTEND_FUNCTIONS[dtype]]
    status = function(*inputs, scale, *caches, *sizes, out.data_ptr(), threads)
    return out if status == 0 else None
