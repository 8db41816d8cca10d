"""Assertion helpers shared by the tests."""

import keras
import numpy as np


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def assert_close(actual, expected, atol=1e-4, rtol=0.0):
    np.testing.assert_allclose(to_numpy(actual), to_numpy(expected), atol=atol, rtol=rtol)


def assert_config_round_trip(obj):
    """`from_config(get_config())` rebuilds an equal config."""
    config = obj.get_config()
    clone = type(obj).from_config(config)
    assert clone.get_config() == config
    return clone


def transformers_copy(backbone):
    """Hugging Face `GemmaForCausalLM` holding `backbone`'s weights (an oracle)."""
    import torch
    import transformers

    from keras_gemma.weight_names import huggingface_config
    from keras_gemma.weight_names import huggingface_tensors

    model = transformers.GemmaForCausalLM(
        transformers.GemmaConfig(**huggingface_config(backbone.config))
    ).eval()
    weights = {v.path: to_numpy(v) for v in backbone.weights}
    state = {
        name: torch.from_numpy(np.ascontiguousarray(to_hf(weights[path])))
        for path, (name, to_hf, _) in huggingface_tensors(backbone.config).items()
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


def value_and_gradients(fn, variables):
    """`fn()` (a scalar) and its gradients with respect to `variables`, on any backend."""
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        def pure(values):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return fn()

        value, grads = jax.value_and_grad(pure)([v.value for v in variables])
    elif backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            value = fn()
        grads = tape.gradient(value, [v.value for v in variables])
    else:
        for v in variables:
            v.value.grad = None
        value = fn()
        value.backward()
        grads = [v.value.grad for v in variables]
    return to_numpy(value), [to_numpy(g) for g in grads]


def train_raw_sentencepiece(**options):
    """A character SentencePiece model with SentencePiece's own defaults plus
    `options` (no Gemma special pieces unless asked), as serialized bytes."""
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["hello world, hello tokenizer"] * 5),
        model_writer=model,
        model_type="char",
        minloglevel=2,
        **options,
    )
    return model.getvalue()
