"""GemmaBackbone: token ids in, final hidden states out."""

import keras
from keras import ops

from keras_gemma import checkpoints
from keras_gemma import distribution
from keras_gemma import internals
from keras_gemma import lora
from keras_gemma.config import GemmaConfig
from keras_gemma.layers import GemmaDecoderBlock
from keras_gemma.layers import RMSNormalization
from keras_gemma.layers.projection import quantization_config
from keras_gemma.layers.projection import quantized_policy
from keras_gemma.presets import PRESETS


def _is_quantizable(layer):
    return isinstance(layer, (keras.layers.EinsumDense, keras.layers.ReversibleEmbedding))


def quantizable_layers(backbone):
    """The token embedding and every projection: the layers holding weights
    that `quantize()` converts."""
    layers = [backbone.token_embedding]
    for block in backbone.transformer_layers:
        attention, ffw = block.attention, block.feed_forward
        layers += [attention.query_dense, attention.key_dense, attention.value_dense]
        layers += [attention.output_dense, ffw.ffw_gating, ffw.ffw_gating_2, ffw.ffw_linear]
    return layers


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaBackbone(keras.Model):
    """The Gemma decoder stack, without the language-model head.

    Token embeddings are multiplied by `sqrt(hidden_dim)`, pass through
    `num_layers` `GemmaDecoderBlock`s and a final `RMSNormalization`. The
    embedding matrix is tied with the output projection, which
    `GemmaCausalLM` applies as `token_embedding(hidden, reverse=True)`.

    `compute_hidden_states()` is the one forward pass: `call()` (training, scoring) and
    cached decoding (`GemmaCausalLM.generate`) both run it.

    Args:
        vocabulary_size: number of token embeddings.
        num_layers: number of decoder blocks.
        num_query_heads: attention query heads.
        num_key_value_heads: key/value heads; 1 is multi-query (2B), equal to
            `num_query_heads` is multi-head (7B), a divisor is grouped-query.
        hidden_dim: model width.
        intermediate_dim: GeGLU width, both branches together (2B: 32768).
        head_dim: size of each attention head.
        layer_norm_epsilon: RMS normalization epsilon.
        dropout: dropout rate in attention and after each residual branch.
        dtype: a dtype or `keras.DTypePolicy`, e.g. `"bfloat16"`.
        quantization_mode: e.g. `"int8"`: build the projections and embedding
            quantized (what `get_config` records after `quantize()`), so a
            quantized checkpoint loads without ever allocating float weights.

    Set `backbone.gradient_checkpointing = True` before `fit` to recompute
    each decoder block in the backward pass instead of storing its
    activations: less memory for long sequences, about a third more compute.

    Example:
    >>> import numpy as np
    >>> backbone = GemmaBackbone(vocabulary_size=100, num_layers=2,
    ...     num_query_heads=4, num_key_value_heads=1, hidden_dim=16,
    ...     intermediate_dim=32, head_dim=8)
    >>> hidden = backbone({"token_ids": np.array([[2, 5, 7]]),
    ...                    "padding_mask": np.array([[1, 1, 1]])})
    >>> tuple(hidden.shape)
    (1, 3, 16)
    """

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        num_query_heads,
        num_key_value_heads,
        hidden_dim,
        intermediate_dim,
        head_dim,
        layer_norm_epsilon=1e-6,
        dropout=0.0,
        dtype=None,
        quantization_mode=None,
        **kwargs,
    ):
        config = GemmaConfig(
            vocabulary_size=vocabulary_size,
            num_layers=num_layers,
            num_query_heads=num_query_heads,
            num_key_value_heads=num_key_value_heads,
            hidden_dim=hidden_dim,
            intermediate_dim=intermediate_dim,
            head_dim=head_dim,
            layer_norm_epsilon=layer_norm_epsilon,
            dropout=dropout,
        )
        super().__init__(dtype=dtype, **kwargs)
        internals.default_quantization_config(self, quantization_config)
        self.config = config
        policy = self.dtype_policy
        # A reloaded quantized model builds its quantized variables directly.
        self.token_embedding = keras.layers.ReversibleEmbedding(
            vocabulary_size,
            hidden_dim,
            tie_weights=True,
            embeddings_initializer=keras.initializers.VarianceScaling(
                scale=1.0, mode="fan_in", distribution="untruncated_normal"
            ),
            dtype=quantized_policy(policy, quantization_mode),
            quantization_config=quantization_config(quantization_mode),
            name="token_embedding",
        )
        self.transformer_layers = [
            GemmaDecoderBlock(
                intermediate_dim=intermediate_dim,
                num_query_heads=num_query_heads,
                num_key_value_heads=num_key_value_heads,
                head_dim=head_dim,
                layer_norm_epsilon=layer_norm_epsilon,
                dropout=dropout,
                quantization_mode=quantization_mode,
                dtype=policy,
                name=f"decoder_block_{i}",
            )
            for i in range(num_layers)
        ]
        self.final_normalization = RMSNormalization(
            layer_norm_epsilon, dtype=policy, name="final_normalization"
        )
        # Build eagerly from shapes: weights exist right after construction
        # (so they can be loaded) without tracing a symbolic forward pass.
        hidden_shape = (None, None, hidden_dim)
        self.token_embedding.build((None, None))
        for block in self.transformer_layers:
            block.build(hidden_shape)
        self.final_normalization.build(hidden_shape)
        self.built = True
        self.gradient_checkpointing = False

    # Read-only views of the config, named as keras-hub names them.
    vocabulary_size = property(lambda self: self.config.vocabulary_size)
    num_layers = property(lambda self: self.config.num_layers)
    num_query_heads = property(lambda self: self.config.num_query_heads)
    num_key_value_heads = property(lambda self: self.config.num_key_value_heads)
    hidden_dim = property(lambda self: self.config.hidden_dim)
    intermediate_dim = property(lambda self: self.config.intermediate_dim)
    head_dim = property(lambda self: self.config.head_dim)

    def compute_hidden_states(
        self,
        token_ids,
        padding_mask=None,
        cache=None,
        cache_update_index=0,
        training=None,
        segment_ids=None,
    ):
        """Runs the decoder stack, optionally reading and writing a KV cache.

        Args:
            token_ids: `[batch, sequence]` int tokens.
            padding_mask: optional `[batch, key_length]`, 0 for padding keys.
                Without a cache the keys are `token_ids`; with one, the cache.
            cache: optional list (one per layer) of `(keys, values)`, from
                `empty_cache()`.
            cache_update_index: position of `token_ids[:, 0]` in the sequence.
            segment_ids: optional `[batch, sequence]` ids of the examples
                packed into each row (`GemmaCausalLMPreprocessor(packing=True)`).

        Returns:
            `(hidden_states, cache)`: `[batch, sequence, hidden_dim]` and the
            updated cache (`None` if none was given).
        """
        x = self.token_embedding(token_ids)
        # Gemma scales embeddings by sqrt(hidden_dim) in the compute dtype, as
        # the reference implementations do; in bfloat16 this rounds.
        x = x * ops.cast(self.config.hidden_dim**0.5, x.dtype)
        updated_cache = []
        for i, block in enumerate(self.transformer_layers):
            if cache is None:

                def run(x, block=block):
                    return block(
                        x, padding_mask=padding_mask, training=training, segment_ids=segment_ids
                    )

                # Recompute the block in the backward pass instead of keeping
                # its activations (Keras's remat: jax.checkpoint, torch's
                # checkpoint, tf.recompute_grad).
                x = keras.remat(run)(x) if self.gradient_checkpointing and training else run(x)
            else:
                x, layer_cache = block(
                    x,
                    padding_mask=padding_mask,
                    cache=cache[i],
                    cache_update_index=cache_update_index,
                    training=training,
                )
                updated_cache.append(layer_cache)
        x = self.final_normalization(x)
        return x, (updated_cache if cache is not None else None)

    def call(self, inputs, training=None):
        hidden, _ = self.compute_hidden_states(
            inputs["token_ids"],
            inputs.get("padding_mask"),
            training=training,
            segment_ids=inputs.get("segment_ids"),
        )
        return hidden

    def empty_cache(self, batch_size, max_length):
        """A zero KV cache for `compute_hidden_states()`: per layer `(keys, values)`."""
        shape = (
            batch_size,
            max_length,
            self.config.num_key_value_heads,
            self.config.head_dim,
        )
        return [
            (ops.zeros(shape, self.compute_dtype), ops.zeros(shape, self.compute_dtype))
            for _ in range(self.config.num_layers)
        ]

    # LoRA (keras_gemma.lora) and model parallelism (keras_gemma.distribution).

    def enable_lora(self, rank, target_layer_names=None, lora_alpha=None):
        """Adds rank-`rank` LoRA adapters and freezes all other weights.

        `target_layer_names`: any of `"query"`, `"key"`, `"value"`,
        `"attention_output"`, `"ffw_gating"`, `"ffw_gating_2"`, `"ffw_linear"`
        (default query and value). Adapters add `(lora_alpha / rank) * a @ b`;
        `lora_alpha` defaults to `rank`. See `keras_gemma.lora.enable_lora`.
        """
        lora.enable_lora(self, rank, target_layer_names, lora_alpha)

    def save_lora_weights(self, path):
        """Saves the adapters to a small safetensors file keyed by layer name."""
        lora.save_lora_weights(self, path)

    def load_lora_weights(self, path):
        """Loads adapters from `save_lora_weights`, enabling LoRA if needed."""
        lora.load_lora_weights(self, path)

    def merge_lora(self):
        """Folds the adapters into the kernels and removes the adapter variables."""
        lora.merge_lora(self)

    def export_lora_to_peft(self, directory, base_model_name_or_path=None):
        """Writes the adapters as a Hugging Face PEFT adapter for transformers' Gemma."""
        lora.export_lora_to_peft(self, directory, base_model_name_or_path)

    # Presets: `keras_gemma.checkpoints` does the work.

    presets = PRESETS  # read-only {name: metadata} of the Gemma 1 presets

    @classmethod
    def from_preset(cls, preset, load_weights=True, dtype=None, **kwargs):
        """Loads a backbone from a preset name, `kaggle://`, `hf://` or a directory.

        Directories may be in keras-hub's Kaggle layout or Hugging Face's;
        `load_weights=False` builds fresh weights offline; `dtype` (e.g.
        `"bfloat16"`) sets the backbone dtype (default: the one it was saved
        in); `kwargs` override the config.
        """
        return checkpoints.load_backbone(cls, preset, load_weights, dtype, **kwargs)

    def save_to_preset(self, preset_dir):
        """Writes the Keras preset layout (config.json, model.weights.h5), atomically."""
        lora.check_merged_before_saving(self)
        checkpoints.save_backbone(self, preset_dir)

    @staticmethod
    def get_layout_map(
        device_mesh,
        model_parallel_dim_name="model",
        data_parallel_dim_name="batch",
        config=None,
    ):
        """A `keras.distribution.LayoutMap` for model-parallel Gemma (JAX).

        keras-hub's signature plus `config` (a `GemmaConfig`, backbone config
        dict or backbone). Without it, as keras-hub is used (the layout is set
        before `from_preset` picks the model), the layout fits every Gemma 1
        preset: a matrix is split only along an axis the mesh's model
        dimension divides in all of them, so 2B's single key/value head is
        never split. `config` gives the best layout for that one model. See
        `keras_gemma.distribution`.

        Example:
        >>> import keras
        >>> from keras_gemma import GemmaConfig
        >>> mesh = keras.distribution.DeviceMesh((1, 2), ("batch", "model"),
        ...     devices=["cpu:0", "cpu:1"])
        >>> GemmaBackbone.get_layout_map(mesh)["decoder_block_0/attention/value/kernel"].axes
        (None, None, 'model')
        >>> layout_map = GemmaBackbone.get_layout_map(mesh, config=GemmaConfig(
        ...     256000, 28, 16, 16, 3072, 49152, 256))
        >>> layout_map["decoder_block_0/attention/value/kernel"].axes
        ('model', None, None)
        """
        return distribution.get_layout_map(
            config, device_mesh, model_parallel_dim_name, data_parallel_dim_name
        )

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Keras's `Model.quantize`, applied to the projections and embedding.

        Only `EinsumDense` projections and the (tied) token embedding hold
        quantizable weights; norms stay in the compute dtype. `"int8"` is
        weight-only by default (per-output-channel int8 weights, activations
        left in the compute dtype), which is what makes decoding faster;
        pass a `keras.quantizers.Int8QuantizationConfig` for Keras's
        int8-activation variant.
        Example: `backbone.quantize("int8")`.
        """
        if filters is None:
            filters = _is_quantizable
        super().quantize(mode, config=config, filters=filters, **kwargs)

    def get_config(self):
        config = {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
            **self.config.to_dict(),
        }
        # Keras's `Layer.quantization_mode` is this model's own (None); the
        # projections carry the mode that a reload must recreate.
        modes = {layer.quantization_mode for layer in quantizable_layers(self)}
        if len(modes) == 1 and None not in modes:
            config["quantization_mode"] = modes.pop()
        return config
