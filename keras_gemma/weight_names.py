"""How our weights are named and laid out in other Gemma implementations.

One table per foreign format; checkpoint conversion and the parity tests
both read these, so a layout fact is written down exactly once.
"""

import numpy as np


def keras_hub_path(path):
    """keras-hub's variable path for one of ours.

    keras-hub keeps the GeGLU projections directly in the decoder block; we
    group them in a `feed_forward` layer. Everything else is named alike.

    >>> keras_hub_path("decoder_block_0/feed_forward/ffw_gating/kernel")
    'decoder_block_0/ffw_gating/kernel'
    """
    return path.replace("/feed_forward/", "/")


def _transposed_in_keras_hub(path):
    # keras-hub stores feed-forward kernels `[in, out]`; we store them
    # `[out, in]` (see `GemmaFeedForward`). Nothing else differs.
    return path.endswith("/kernel") and "/feed_forward/" in path


def keras_hub_shape(path, shape):
    """The shape keras-hub stores our variable `path` of `shape` in."""
    return tuple(reversed(shape)) if _transposed_in_keras_hub(path) else tuple(shape)


def keras_hub_array(path, array):
    """Our NumPy array for variable `path` in keras-hub's layout, or
    keras-hub's in ours: the same map both ways (a transpose or nothing).

    >>> keras_hub_array("decoder_block_0/feed_forward/ffw_linear/kernel",
    ...     np.zeros((8, 32))).shape
    (32, 8)
    """
    if _transposed_in_keras_hub(path):
        return np.ascontiguousarray(np.transpose(array))
    return array


def assign_to_keras_hub(backbone, keras_hub_backbone):
    """Copies our backbone's weights into a keras-hub `GemmaBackbone` of the
    same config, one tensor on the host at a time."""
    theirs = {v.path: v for v in keras_hub_backbone.weights}
    for variable in backbone.weights:
        array = keras_hub_array(variable.path, np.asarray(variable.numpy()))
        theirs[keras_hub_path(variable.path)].assign(array)


def huggingface_tensors(config):
    """Maps our variable paths to Hugging Face `GemmaForCausalLM` tensors.

    Returns `{our_path: (hf_name, to_hf, from_hf)}` where `to_hf(array)`
    turns our array into theirs and `from_hf` the reverse. Hugging Face stores
    `nn.Linear` weights as `[out_features, in_features]` with heads merged.
    """
    n, kv, h, d = (
        config.num_query_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.hidden_dim,
    )

    def same(x):
        return x

    def heads_in(heads):
        # ours [heads, d, h] <-> theirs [heads * h, d]
        to_hf = lambda x: np.transpose(x, (0, 2, 1)).reshape(heads * h, d)
        from_hf = lambda x: np.transpose(np.reshape(x, (heads, h, d)), (0, 2, 1))
        return to_hf, from_hf

    def heads_out(x):
        # ours [n, h, d] <-> theirs [d, n * h]
        return np.reshape(x, (n * h, d)).T

    tensors = {
        "token_embedding/embeddings": ("model.embed_tokens.weight", same, same),
        "final_normalization/scale": ("model.norm.weight", same, same),
    }
    for i in range(config.num_layers):
        ours, theirs = f"decoder_block_{i}", f"model.layers.{i}"
        tensors.update(
            {
                f"{ours}/pre_attention_norm/scale": (
                    f"{theirs}.input_layernorm.weight",
                    same,
                    same,
                ),
                f"{ours}/attention/query/kernel": (
                    f"{theirs}.self_attn.q_proj.weight",
                    *heads_in(n),
                ),
                f"{ours}/attention/key/kernel": (
                    f"{theirs}.self_attn.k_proj.weight",
                    *heads_in(kv),
                ),
                f"{ours}/attention/value/kernel": (
                    f"{theirs}.self_attn.v_proj.weight",
                    *heads_in(kv),
                ),
                f"{ours}/attention/attention_output/kernel": (
                    f"{theirs}.self_attn.o_proj.weight",
                    heads_out,
                    lambda x: np.reshape(np.transpose(x), (n, h, d)),
                ),
                f"{ours}/pre_ffw_norm/scale": (
                    f"{theirs}.post_attention_layernorm.weight",
                    same,
                    same,
                ),
                f"{ours}/feed_forward/ffw_gating/kernel": (
                    f"{theirs}.mlp.gate_proj.weight",
                    same,
                    same,
                ),
                f"{ours}/feed_forward/ffw_gating_2/kernel": (
                    f"{theirs}.mlp.up_proj.weight",
                    same,
                    same,
                ),
                f"{ours}/feed_forward/ffw_linear/kernel": (
                    f"{theirs}.mlp.down_proj.weight",
                    same,
                    same,
                ),
            }
        )
    return tensors


def huggingface_config(config):
    """A transformers `GemmaConfig` dict for one of our `GemmaConfig`s."""
    return {
        "architectures": ["GemmaForCausalLM"],
        "model_type": "gemma",
        "vocab_size": config.vocabulary_size,
        "hidden_size": config.hidden_dim,
        "intermediate_size": config.intermediate_dim // 2,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_query_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192,
        "rms_norm_eps": config.layer_norm_epsilon,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
    }
