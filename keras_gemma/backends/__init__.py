"""Backend-, device- and CPU-specific code, behind one seam.

The model is written once, in Keras; generation (`keras_gemma.generation`)
runs it through a *decoder*: `prefill(token_ids, prefill_length, start) ->
(cache, logits)` (the KV cache of the first `prefill_length` tokens, the
float32 logits `[batch, vocab]` for position `start`) and
`next_logits(token_ids, cache, index) -> (logits, cache)` (position `index`,
feeding the token before it). The default is the Keras forward pass
(`generation.KerasDecoder`); a specialised decoder is registered here with
where it applies, picked once per call by `decoder_for`, and held equal to
the default by its tests. `compile_stateless` compiles per backend
(`xla_cpu` rewrites JAX's CPU programs in low precision);
`compile_random_draw` keeps a sampler's draws the same in and out of it.

Example:
>>> [decoder.name for decoder in DECODERS]
['torch_cpu']
"""

import dataclasses
import importlib

import keras


@dataclasses.dataclass(frozen=True)
class DecoderEntry:
    """A specialised decoder: `module.Decoder(backbone)`, used on `backend`
    when the backbone's weights live on one of `devices` and
    `module.supports(backbone)` (its dtype and quantization check)."""

    name: str
    backend: str
    devices: tuple
    module: str

    def applies(self, backbone):
        return (
            keras.config.backend() == self.backend
            and _device_type(backbone.token_embedding.weights[0]) in self.devices
            and importlib.import_module(self.module).supports(backbone)
        )

    def build(self, backbone):
        return importlib.import_module(self.module).Decoder(backbone)


# `torch_cpu` skips eager Keras's per-op Python. Never on CUDA: it has not
# been measured there, and Keras's path is correct everywhere.
DECODERS = (DecoderEntry("torch_cpu", "torch", ("cpu",), "keras_gemma.backends.torch_cpu"),)


def decoder_for(backbone):
    """The first registered decoder that applies to `backbone`, or None."""
    for entry in DECODERS:
        if entry.applies(backbone):
            return entry.build(backbone)
    return None


def _device_type(variable):
    value = variable.value
    if keras.config.backend() == "torch":
        return value.device.type
    if keras.config.backend() == "jax":
        return next(iter(value.devices())).platform
    return "gpu" if "GPU" in getattr(value, "device", "").upper() else "cpu"


def compile_stateless(fn, model, whole_loop=True):
    """Compiles `fn(*tensors)`, a pure function of `model`'s weights.

    JAX: `jax.jit` with the weights passed in as arguments, so new values
    (after `fit`) never retrace; low precision on CPU goes through
    `xla_cpu.accumulate_in_float32`. TensorFlow: a `tf.function`, with XLA for a
    `whole_loop` (not for one streaming step, which XLA takes long to
    compile on CPU for little gain). PyTorch: eager under `torch.no_grad()`.
    The result holds `model`'s current variables: callers drop it when
    those are replaced (`generation.Generator` does).
    """
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        from keras_gemma.backends import xla_cpu

        variables = list(model.variables)

        def stateless(values, *args):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return fn(*args)

        if xla_cpu.applies(model):
            stateless = xla_cpu.accumulate_in_float32(stateless)
        jitted = jax.jit(stateless)
        return lambda *args: jitted([v.value for v in variables], *args)
    if backend == "tensorflow":
        import tensorflow as tf

        # On CPU, XLA computes low-precision dots in float32 with float32 copies
        # of the weights hoisted out of the loop (more memory, and slower).
        low_precision = keras.backend.standardize_dtype(model.compute_dtype) != "float32"
        xla = not (low_precision and not tf.config.list_logical_devices("GPU"))
        return tf.function(fn, jit_compile=whole_loop and xla)
    if backend == "torch":
        import torch

        return torch.no_grad()(fn)
    return fn


def compile_random_draw(fn):
    """Wraps `fn(*tensors)`, a seeded random draw, so that it draws the same
    numbers inside and outside a compiled generate loop.

    TensorFlow's stateless random ops have separate XLA lowerings that draw
    other numbers from the same seed (`StatelessMultinomial`, behind
    `keras.random.categorical`, is a Gumbel-max over XLA's own uniforms under
    XLA, an inverse CDF in the CPU kernel). `compile_stateless` runs
    `generate`'s whole loop under XLA but a streaming step without it (under
    XLA that step would recompile for every index), so on TensorFlow the
    draw itself is always XLA-compiled: inlined into an XLA loop, its own
    small cluster in a streaming step or a non-XLA loop. JAX and PyTorch
    draw the same numbers either way: `fn` unchanged.
    """
    if keras.config.backend() != "tensorflow":
        return fn
    import tensorflow as tf

    return tf.function(fn, jit_compile=True)
