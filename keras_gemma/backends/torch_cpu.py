"""Generation's forward pass in plain PyTorch on CPU, over the model's own weights.

Eager Keras on torch costs tens of microseconds of Python per op and layer
call, most of a small model's decode step; this runs the same step in plain
torch: `cpu_kernels` for decode steps (products fused with the RMS norm,
GeGLU's gating and the residual) and PyTorch's kernels otherwise, reading
every `[out, in]` kernel as stored. It computes what
`GemmaBackbone.compute_hidden_states` plus the task's logits compute (same
dtypes and float32 islands; `tests/test_torch_decoding.py` holds them equal),
for inference only. Weights are read, not copied, from the Keras variables
at each construction (cast once under mixed precision, as Keras's autocast).
"""

import functools

import torch
import torch.nn.functional as F

from keras_gemma import internals
from keras_gemma.backbone import quantizable_layers
from keras_gemma.backends import cpu_kernels
from keras_gemma.layers.attention import MASKED_LOGIT
from keras_gemma.layers.rotary_embedding import inverse_frequencies


@functools.cache
def _has_onednn_linear():
    # For float32, oneDNN's inner product streams weights faster than the
    # MKL GEMV behind `F.linear`, which runs on one core on some CPUs.
    try:
        return bool(internals.onednn_linear(torch.ones(1, 4), torch.ones(1, 4)).sum() == 4)
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


# Without bfloat16 instructions, PyTorch's low-precision products of several
# rows (prefill, batches) are much slower than converting the kernel to
# float32 a cache-sized piece at a time and multiplying those; for fewer
# rows the conversion costs more than it saves. The same holds for int8
# kernels past `_INT8PACK_MAX_ROWS` rows or times float32 rows.
_FLOAT32_PIECES_MIN_ROWS = 6
_FLOAT32_PIECE = 1 << 21  # weights per piece: 8 MB of float32


def _cpu_has_bfloat16_instructions():
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX),
    where PyTorch's own bfloat16 products beat the float32 pieces."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_kernels.cpu_flags())


def _linear(x, weight):
    """`x @ weight.T` for an `[out, in]` weight, where `cpu_kernels` does not
    apply (`torch.mv` streams one bfloat16 row fastest)."""
    if x.dtype == torch.float32 and _has_onednn_linear():
        return internals.onednn_linear(x, weight)
    if x.dtype != torch.float32 and x.shape[0] >= _FLOAT32_PIECES_MIN_ROWS:
        if not (x.dtype == torch.bfloat16 and _cpu_has_bfloat16_instructions()):
            return _linear_in_float32_pieces(x, weight)
    if x.shape[0] == 1:
        return torch.mv(weight, x[0])[None]
    return F.linear(x, weight)


def _linear_in_float32_pieces(x, weight, scale=None):
    """`(x @ weight.T) * scale` in float32, rounded to `x.dtype`, converting
    `weight` (any dtype; int8 values are exact in float32) a piece at a time."""
    out_dim, in_dim = weight.shape
    step = max(1, _FLOAT32_PIECE // in_dim)
    piece = torch.empty(min(step, out_dim), in_dim)
    rows = x.float()
    y = torch.empty(x.shape[0], out_dim)
    for start in range(0, out_dim, step):
        weights = piece[: min(step, out_dim - start)]
        weights.copy_(weight[start : start + step])
        y[:, start : start + step] = _linear(rows, weights)
    if scale is not None:
        y *= scale.float()
    return y.to(x.dtype)


# PyTorch's int8 kernel's cost grows with every row, faster than the float32
# pieces', and it is far slower with float32 rows; the two tie at about
# this many bfloat16 rows over the 2B kernel shapes.
_INT8PACK_MAX_ROWS = 32


def _int8_linear(x, kernel, scale):
    """`(x @ kernel.T) * scale` for int8 `kernel` `[out, in]`."""
    _, in_dim = kernel.shape
    # The kernel reads garbage or crashes on bfloat16 rows whose length is not
    # a multiple of 16, or that do not start on a 32-byte boundary (a view
    # into a larger tensor; copies are 64-byte aligned).
    if x.dtype == torch.bfloat16 and x.shape[0] <= _INT8PACK_MAX_ROWS and in_dim % 16 == 0:
        if x.data_ptr() % 64:
            x = x.clone(memory_format=torch.contiguous_format)
        return internals.int8pack_mm(x, kernel, scale)
    return _linear_in_float32_pieces(x, kernel, scale)


class _Projection:
    """One `EinsumDense` as a function of `[rows, in]` inputs -> `[rows, out]`;
    its `[out..., in]` kernel's `[out, in]` matrix is a view of the variable."""

    def __init__(self, layer, dtype):
        self.quantized = layer.quantization_mode == "int8"
        if layer.quantization_mode not in (None, "int8"):
            raise NotImplementedError(
                f"Decoding with {layer.quantization_mode!r} weights on torch is not supported."
            )
        kernel = internals.stored_kernel(layer).value
        self.kernel = kernel.reshape(-1, kernel.shape[-1])
        self.scale = None
        if self.quantized:
            # Keras stores the scale `s` of `q = w * s`; the kernel wants w = q / s.
            self.scale = (1.0 / layer.kernel_scale.value.reshape(-1)).to(dtype)
        else:  # a cast copy only under mixed precision
            self.kernel = self.kernel.to(dtype)
        self.lora = None
        if layer.lora_enabled:
            scale = layer.lora_alpha / layer.lora_rank
            a, b = layer.lora_kernel_a.value.to(dtype), layer.lora_kernel_b.value.to(dtype)
            # The update `a @ b` is `[out..., in]`: x @ b.T @ a.T.
            self.lora = (b.t(), a.reshape(-1, a.shape[-1]).t() * scale)

    def __call__(self, x):
        if self.quantized:
            return self.add_lora(x, _int8_linear(x, self.kernel, self.scale))
        return self.add_lora(x, _linear(x, self.kernel))

    def add_lora(self, x, y):
        """`y`, the product of `x`, plus the LoRA update of `x` if any."""
        if self.lora is None:
            return y
        b, a = self.lora
        return y + torch.matmul(torch.matmul(x, b), a)


def _prepare(kernels, scales):
    """`cpu_kernels.prepare`, except for bfloat16 kernels on a CPU with
    bfloat16 instructions, where PyTorch's own products stream them faster."""
    if _cpu_has_bfloat16_instructions() and all(k.dtype == torch.bfloat16 for k in kernels):
        return None
    return cpu_kernels.prepare(kernels, scales)


# int8 products of a few more rows than `cpu_kernels` takes at once (a short
# prompt's prefill) still run faster through it, a chunk at a time, than
# through PyTorch's int8 kernel.
_INT8_CHUNKED_MAX_ROWS = 32


class _Projections:
    """Several projections of one input, `[rows, in]` -> a `[rows, out]`
    each, in one `cpu_kernels` call where it applies (decode steps): each
    call and PyTorch op costs microseconds, as long as reading a small
    key or value matrix takes."""

    def __init__(self, layers, dtype):
        self.dtype = dtype
        self.projections = [_Projection(layer, dtype) for layer in layers]
        self.native = _prepare(
            [p.kernel for p in self.projections], [p.scale for p in self.projections]
        )
        self.lora = any(p.lora is not None for p in self.projections)
        quantized = all(p.quantized for p in self.projections)
        self.chunked_max_rows = _INT8_CHUNKED_MAX_ROWS if quantized else cpu_kernels.MAX_ROWS

    def __call__(self, x, norm=None, eps=None, up=None, residual=None):
        """The projections of `x`, of `_rms_norm(x, norm, eps)` with `norm`,
        or of `gelu(x) * up` with `up`; plus `residual` (one projection).
        The kernel does those steps itself where it applies (one call, no
        PyTorch ops; see `cpu_kernels.Products`)."""
        rows = x.shape[0]
        if self.native is not None and not self.lora and rows <= cpu_kernels.MAX_ROWS:
            ys = self.native(x, norm, eps, up=up, residual=residual)
            if ys is not None:
                return ys
        # Otherwise (LoRA, whose update reads the kernel's input too; more
        # rows; no kernel) those steps run here.
        if norm is not None:
            x = _rms_norm(x, norm, eps, self.dtype)
        if up is not None:
            x = F.gelu(x, approximate="tanh") * up
        ys = None
        if self.native is not None and x.dim() == 2 and rows <= self.chunked_max_rows:
            chunks = [self.native(chunk) for chunk in x.split(cpu_kernels.MAX_ROWS)]
            if all(chunk is not None for chunk in chunks):
                ys = chunks[0] if len(chunks) == 1 else [torch.cat(y) for y in zip(*chunks)]
        if ys is None:
            ys = [projection(x) for projection in self.projections]
        else:
            ys = [p.add_lora(x, y) for p, y in zip(self.projections, ys)]
        return ys if residual is None else [residual + y for y in ys]


class _Block:
    def __init__(self, block, dtype):
        attention, ffw = block.attention, block.feed_forward
        self.eps = block.layer_norm_epsilon
        self.attention_norm = _norm_scale(block.pre_attention_norm, dtype)
        self.ffw_norm = _norm_scale(block.pre_ffw_norm, dtype)
        self.query_key_value = _Projections(
            [attention.query_dense, attention.key_dense, attention.value_dense], dtype
        )
        self.output = _Projections([attention.output_dense], dtype)
        self.gate_up = _Projections([ffw.ffw_gating, ffw.ffw_gating_2], dtype)
        self.down = _Projections([ffw.ffw_linear], dtype)


def _norm_scale(norm, dtype):
    # `1 + scale` in float32 from the scale as the layer reads it (rounded to
    # the compute dtype under mixed precision).
    return norm.scale.value.to(dtype).float() + 1.0


def _rms_norm(x, scale, eps, dtype):
    return torch.rms_norm(x.float(), (x.shape[-1],), scale, eps).to(dtype)


def _matmul(a, b):
    """`a @ b` rounded to `a`'s dtype. Low precision multiplies in float32,
    which is what PyTorch's CPU kernels do inside, only faster."""
    if a.dtype != torch.float32:
        return torch.matmul(a.float(), b.float()).to(a.dtype)
    return torch.matmul(a, b)


def _rotate(x, cos, sin):
    """`apply_rotary` with `cos` = [cos, cos] and `sin` = [-sin, sin] (see
    `hidden_states`): `[x1, x2] * cos + [x2, x1] * sin` rounds as its
    `[x1 cos - x2 sin, x2 cos + x1 sin]` does, in 4 ops instead of 9."""
    rows = x.float()
    return (rows * cos + rows.roll(rows.shape[-1] // 2, dims=-1) * sin).to(x.dtype)


def _attend(query, keys, values, causal):
    """Scaled rotated `query` `[b, t, heads, h]` attending to `keys` and
    `values` `[b, s, kv_heads, h]` under `causal` (`[t * groups, s]`, or None
    for every key) -> `[b * t, heads * h]`, as `GemmaAttention._attend`."""
    batch, length, heads, h = query.shape
    kv = keys.shape[2]
    groups = heads // kv
    # Query t*groups + i is position start + t; keys are cache slots.
    query = query.view(batch, length, kv, groups, h)
    query = query.permute(0, 2, 1, 3, 4).reshape(batch, kv, length * groups, h)
    logits = _matmul(query, keys.permute(0, 2, 3, 1)).float()  # [b, k, t*g, s]
    if causal is not None:
        logits = logits.masked_fill(~causal, MASKED_LOGIT)
    probabilities = torch.softmax(logits, dim=-1).to(values.dtype)
    attended = _matmul(probabilities, values.transpose(1, 2))  # [b, k, t*g, h]
    attended = attended.view(batch, kv, length, groups, h).permute(0, 2, 1, 3, 4)
    return attended.reshape(batch * length, heads * h)


def supports(backbone):
    """Whether `Decoder` computes exactly this backbone's forward pass.

    Not for int8 with quantized activations or other quantization modes
    (int4, GPTQ, ...): generation then runs the Keras forward pass.
    """
    return all(
        layer.quantization_mode in (None, "int8")
        and getattr(layer, "inputs_quantizer", None) is None
        for layer in quantizable_layers(backbone)
    )


class Decoder:
    """Prefill and single-token steps of a `GemmaCausalLM`, in plain PyTorch.

    A decoder as `keras_gemma.backends` defines it (same cache as
    `GemmaBackbone.empty_cache`), writing the cache in place.

    Example:
    >>> import keras, numpy as np
    >>> from keras_gemma import GemmaBackbone, GemmaCausalLM
    >>> lm = GemmaCausalLM(GemmaBackbone(vocabulary_size=50, num_layers=1,
    ...     num_query_heads=2, num_key_value_heads=1, hidden_dim=8,
    ...     intermediate_dim=16, head_dim=4))
    >>> if keras.config.backend() == "torch":
    ...     decoder = Decoder(lm.backbone)
    ...     ids = keras.ops.convert_to_tensor([[2, 7, 9, 0]])
    ...     cache, logits = decoder.prefill(ids, prefill_length=3, start=3)
    ...     logits, cache = decoder.next_logits(ids, cache, 3)
    ...     assert tuple(logits.shape) == (1, 50)
    """

    eager = True  # reads the weights when built: build one per generation call

    @torch.no_grad()
    def __init__(self, backbone):
        self.config = config = backbone.config
        self.dtype = getattr(torch, backbone.compute_dtype)
        self.empty_cache = backbone.empty_cache
        embedding = backbone.token_embedding
        self.embedding_scale = None
        if embedding.quantization_mode == "int8":
            self.embeddings = internals.stored_embeddings(embedding).value
            self.embedding_scale = (1.0 / embedding.embeddings_scale.value).to(self.dtype)
        else:
            self.embeddings = embedding.embeddings.value.to(self.dtype)
        self.native_logits = _prepare([self.embeddings], [self.embedding_scale])
        self.blocks = [_Block(block, self.dtype) for block in backbone.transformer_layers]
        self.final_norm = _norm_scale(backbone.final_normalization, self.dtype)
        # `rotary_angles`'s frequencies, once: its Keras ops cost more than
        # the arithmetic at each step.
        self.inverse_frequencies = inverse_frequencies(config.head_dim)
        self.eps = config.layer_norm_epsilon

    def _embed(self, token_ids):
        x = self.embeddings[token_ids]
        if self.embedding_scale is not None:
            x = x.to(self.dtype) * self.embedding_scale[token_ids][..., None]
        return x * torch.tensor(self.config.hidden_dim**0.5, dtype=self.dtype)

    def logits(self, hidden):
        """Tied output projection, `[rows, hidden] -> [rows, vocab]` float32."""
        if self.native_logits is not None and (logits := self.native_logits(hidden)):
            return logits[0].float()
        if self.embedding_scale is None:
            return _linear(hidden, self.embeddings).float()
        return _int8_linear(hidden, self.embeddings, self.embedding_scale).float()

    def hidden_states(self, token_ids, cache, start):
        """Final-normalized hidden states `[batch, length, hidden]` of
        `token_ids` at positions `start...`, attending to the cache; and
        the cache, updated."""
        c = self.config
        batch, length = token_ids.shape
        kv, h = c.num_key_value_heads, c.head_dim
        groups = c.num_query_heads // kv
        positions = torch.arange(
            start, start + length, dtype=torch.float32, device=self.inverse_frequencies.device
        )
        angles = (positions[:, None] * self.inverse_frequencies[None, :])[None, :, None, :]
        cos, sin = angles.cos(), angles.sin()  # [1, t, 1, h/2]
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)
        end = start + length
        causal = None  # one new position sees every key up to itself
        if length > 1:
            positions = torch.arange(end, device=token_ids.device)
            causal = positions[None, :] <= positions[start:, None]
            causal = causal.repeat_interleave(groups, dim=0)
        scale = torch.tensor(h**-0.5, dtype=self.dtype)
        scale_value = scale.item()
        angles = (cos.view(-1), sin.view(-1)) if length == 1 else None
        x = self._embed(token_ids).reshape(batch * length, -1)
        updated_cache = []
        for block, (key_cache, value_cache) in zip(self.blocks, cache):
            # Written in place; a cache that is a view (e.g. of another
            # array's storage) is materialized first.
            key_cache, value_cache = key_cache.contiguous(), value_cache.contiguous()
            updated_cache.append((key_cache, value_cache))
            query, key, value = block.query_key_value(x, block.attention_norm, block.eps)
            attended = None
            if length == 1:  # one call instead of ~25 ops
                caches = (key_cache, value_cache, start)
                attended = cpu_kernels.attend(query, key, value, *angles, scale_value, *caches)
            if attended is None:
                query = _rotate(query.view(batch, length, -1, h), cos, sin)
                key = _rotate(key.view(batch, length, kv, h), cos, sin)
                key_cache[:, start:end] = key.to(key_cache.dtype)
                value_cache[:, start:end] = value.view(batch, length, kv, h)
                attended = _attend(query * scale, key_cache[:, :end], value_cache[:, :end], causal)
            (x,) = block.output(attended, residual=x)
            gate, up = block.gate_up(x, block.ffw_norm, block.eps)
            (x,) = block.down(gate, up=up, residual=x)
        x = _rms_norm(x, self.final_norm, self.eps, self.dtype)
        return x.view(batch, length, -1), updated_cache

    @torch.no_grad()
    def prefill(self, token_ids, prefill_length, start):
        """The cache of the first `prefill_length` tokens, and the logits
        `[batch, vocab]` for position `start`."""
        cache = self.empty_cache(token_ids.shape[0], token_ids.shape[1])
        hidden, cache = self.hidden_states(token_ids[:, :prefill_length], cache, 0)
        return cache, self.logits(hidden[:, int(start) - 1])

    @torch.no_grad()
    def next_logits(self, ids, cache, index):
        """Logits `[batch, vocab]` for position `index`, feeding the token before it."""
        index = int(index)
        hidden, cache = self.hidden_states(ids[:, index - 1 : index], cache, index - 1)
        return self.logits(hidden[:, 0]), cache
