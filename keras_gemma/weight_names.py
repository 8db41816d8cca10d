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


def mapped_shape(to_theirs, shape):
    """The shape `to_theirs` turns an array of `shape` into, computed on a
    view without data (the maps here only reshape and transpose)."""
    return to_theirs(np.broadcast_to(np.int8(0), shape)).shape


def keras_hub_tensors(config, quantization_mode=None):
    """Maps our variable paths to keras-hub `GemmaBackbone` variables.

    Returns `{our_path: (keras_hub_path, to_keras_hub, from_keras_hub)}`
    for every weight in `config.weight_shapes(quantization_mode)`. keras-hub
    stores kernels `[in, out]`: query/key/value `[heads, hidden, head_dim]`,
    output `[heads, head_dim, hidden]`, feed-forward `[in, out]`; ours are
    `[out, in]` (see `GemmaAttention`). int8 scales are alike. The maps
    return views where they can (make them contiguous before writing).

    >>> from keras_gemma import GemmaConfig
    >>> config = GemmaConfig(vocabulary_size=64, num_layers=1, num_query_heads=2,
    ...     num_key_value_heads=1, hidden_dim=8, intermediate_dim=32, head_dim=4)
    >>> path = "decoder_block_0/attention/attention_output/kernel"
    >>> keras_hub_tensors(config)[path][1](np.zeros((8, 8))).shape
    (2, 4, 8)
    """
    n, h, d = config.num_query_heads, config.head_dim, config.hidden_dim
    swap = lambda x: np.swapaxes(x, -1, -2)  # its own inverse
    to_heads_first = lambda x: np.reshape(np.transpose(x), (n, h, d))
    from_heads_first = lambda x: np.transpose(np.reshape(x, (n * h, d)))
    tensors = {}
    for path in config.weight_shapes(quantization_mode):
        to_theirs = from_theirs = lambda x: x
        if path.endswith("/attention_output/kernel"):
            to_theirs, from_theirs = to_heads_first, from_heads_first
        elif path.endswith("/kernel"):
            to_theirs = from_theirs = swap
        tensors[path] = (keras_hub_path(path), to_theirs, from_theirs)
    return tensors


def assign_to_keras_hub(backbone, keras_hub_backbone):
    """Copies our backbone's weights into a keras-hub `GemmaBackbone` of the
    same config, one tensor on the host at a time."""
    theirs = {v.path: v for v in keras_hub_backbone.weights}
    ours = {v.path: v for v in backbone.weights}
    for path, (their_path, to_theirs, _) in keras_hub_tensors(backbone.config).items():
        array = np.ascontiguousarray(to_theirs(np.asarray(ours[path].numpy())))
        theirs[their_path].assign(array)


def huggingface_tensors(config):
    """Maps our variable paths to Hugging Face `GemmaForCausalLM` tensors.

    Returns `{our_path: (hf_name, to_hf, from_hf)}` where `to_hf(array)`
    turns our array into theirs and `from_hf` the reverse. Hugging Face stores
    `nn.Linear` weights as `[out_features, in_features]` with heads merged.
    """
    kv, h, d = config.num_key_value_heads, config.head_dim, config.hidden_dim
    same = lambda x: x
    heads_merged = lambda x: np.reshape(x, (-1, d))  # [heads, h, d] -> [heads * h, d]

    def heads_split(heads):
        return lambda x: np.reshape(x, (heads, h, d))

    # Ours (inside decoder_block_i) -> theirs (inside model.layers.i), from_hf.
    block = {
        "pre_attention_norm/scale": ("input_layernorm", same),
        "attention/query/kernel": ("self_attn.q_proj", heads_split(config.num_query_heads)),
        "attention/key/kernel": ("self_attn.k_proj", heads_split(kv)),
        "attention/value/kernel": ("self_attn.v_proj", heads_split(kv)),
        "attention/attention_output/kernel": ("self_attn.o_proj", same),
        "pre_ffw_norm/scale": ("post_attention_layernorm", same),
        "feed_forward/ffw_gating/kernel": ("mlp.gate_proj", same),
        "feed_forward/ffw_gating_2/kernel": ("mlp.up_proj", same),
        "feed_forward/ffw_linear/kernel": ("mlp.down_proj", same),
    }
    tensors = {
        "token_embedding/embeddings": ("model.embed_tokens.weight", same, same),
        "final_normalization/scale": ("model.norm.weight", same, same),
    }
    for i in range(config.num_layers):
        for ours, (theirs, from_hf) in block.items():
            to_hf = same if from_hf is same else heads_merged
            name = f"model.layers.{i}.{theirs}.weight"
            tensors[f"decoder_block_{i}/{ours}"] = (name, to_hf, from_hf)
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
