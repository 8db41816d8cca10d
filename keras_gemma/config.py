"""The one place Gemma's hyperparameters live, validated once."""

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Architecture hyperparameters of a Gemma backbone.

    `intermediate_dim` counts both GeGLU branches together, as Gemma's
    published configs do (2B: 32768), so each branch is half of it.

    Example:
    >>> config = GemmaConfig(vocabulary_size=256000, num_layers=18,
    ...     num_query_heads=8, num_key_value_heads=1, hidden_dim=2048,
    ...     intermediate_dim=32768, head_dim=256)
    >>> config.num_parameters()
    2506172416
    """

    vocabulary_size: int
    num_layers: int
    num_query_heads: int
    num_key_value_heads: int
    hidden_dim: int
    intermediate_dim: int
    head_dim: int
    layer_norm_epsilon: float = 1e-6
    dropout: float = 0.0

    def __post_init__(self):
        for name in [field.name for field in dataclasses.fields(self) if field.type is int]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
        if self.num_query_heads % self.num_key_value_heads:
            raise ValueError(
                "`num_query_heads` must be a multiple of `num_key_value_heads` (1 for "
                "multi-query attention, `num_query_heads` for multi-head). Received: "
                f"num_query_heads={self.num_query_heads}, "
                f"num_key_value_heads={self.num_key_value_heads}."
            )
        if self.intermediate_dim % 2:
            raise ValueError(
                "`intermediate_dim` counts both GeGLU branches and must be even. "
                f"Received: intermediate_dim={self.intermediate_dim}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"`head_dim` must be even for rotary embeddings. Received: head_dim={self.head_dim}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: {self.dropout}")
        if self.layer_norm_epsilon <= 0:
            raise ValueError(
                f"`layer_norm_epsilon` must be positive. Received: {self.layer_norm_epsilon}"
            )

    def to_dict(self):
        return dataclasses.asdict(self)

    def weight_shapes(self, quantization_mode=None):
        """Every weight of the backbone by variable path, with its shape.

        Weight files are checked against this before anything is loaded, and
        the parameter count comes from it, so no weights need allocating.
        With `quantization_mode="int8"` the kernels and embedding (same
        shapes, int8) come with the per-output-channel scales Keras adds.
        """
        d, h = self.hidden_dim, self.head_dim
        n, kv = self.num_query_heads, self.num_key_value_heads
        f = self.intermediate_dim // 2
        scales = quantization_mode == "int8"
        shapes = {"token_embedding/embeddings": (self.vocabulary_size, d)}
        if scales:
            shapes["token_embedding/embeddings_scale"] = (self.vocabulary_size,)
        kernels = {  # `[out, in]`: see `GemmaAttention` and `GemmaFeedForward`.
            "attention/query": (n, h, d),
            "attention/key": (kv, h, d),
            "attention/value": (kv, h, d),
            "attention/attention_output": (d, n * h),
            "feed_forward/ffw_gating": (f, d),
            "feed_forward/ffw_gating_2": (f, d),
            "feed_forward/ffw_linear": (d, f),
        }
        for i in range(self.num_layers):
            block = f"decoder_block_{i}"
            shapes[f"{block}/pre_attention_norm/scale"] = (d,)
            shapes[f"{block}/pre_ffw_norm/scale"] = (d,)
            for name, kernel in kernels.items():
                shapes[f"{block}/{name}/kernel"] = kernel
                if scales:  # Keras keeps an int8 kernel's scale in its outputs' shape.
                    shapes[f"{block}/{name}/kernel_scale"] = (1, 1, *kernel[:-1])
        shapes["final_normalization/scale"] = (d,)
        return shapes

    def num_parameters(self):
        return sum(math.prod(shape) for shape in self.weight_shapes().values())
