"""Shared pytest fixtures."""

import pytest

# Enough varied text for a few hundred BPE merges, including the chat
# template, digits and runs of whitespace that Gemma prompts contain.
TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "She sells sea shells by the sea shore, and the shells she sells are sea shells.",
    "How much wood would a woodchuck chuck if a woodchuck could chuck wood?",
    "Peter Piper picked a peck of pickled peppers.",
    "To be, or not to be, that is the question.",
    "All that glitters is not gold; all who wander are not lost.",
    "What is 12 plus 30? 12 plus 30 is 42.",
    "In 1969, 3 astronauts flew 384400 kilometres to the Moon.",
    "<start_of_turn>user\nWhat color is a banana?<end_of_turn>\n"
    "<start_of_turn>model\nA banana is yellow.<end_of_turn>",
    "<start_of_turn>user\nTranslate cat to French.<end_of_turn>\n"
    "<start_of_turn>model\nchat<end_of_turn>",
    "def tokenize(text):\n    return text.split()\n",
    "Keras runs on JAX, PyTorch and TensorFlow.",
    "Café, naïve, résumé and jalapeño are borrowed words.",
]
TOKENIZER_VOCABULARY_SIZE = 384


@pytest.fixture(scope="session")
def vocab_proto():
    """Serialized Gemma-style SentencePiece model trained on a tiny corpus."""
    from keras_gemma.tokenizer import train_sentencepiece

    return train_sentencepiece(TOKENIZER_CORPUS, TOKENIZER_VOCABULARY_SIZE)


# Tiny architectures covering each attention layout Gemma can take.
TINY_CONFIGS = {
    "mqa": dict(num_query_heads=4, num_key_value_heads=1),
    "gqa": dict(num_query_heads=4, num_key_value_heads=2),
    "mha": dict(num_query_heads=4, num_key_value_heads=4),
}


def tiny_backbone_kwargs(layout="mqa", vocabulary_size=TOKENIZER_VOCABULARY_SIZE, **overrides):
    kwargs = dict(
        vocabulary_size=vocabulary_size,
        num_layers=2,
        hidden_dim=32,
        intermediate_dim=64,
        head_dim=8,
        **TINY_CONFIGS[layout],
    )
    kwargs.update(overrides)
    return kwargs


def make_backbone(layout="mqa", seed=0, **overrides):
    """A tiny backbone with deterministic random weights (norm scales too)."""
    import keras
    import numpy as np

    from keras_gemma import GemmaBackbone

    keras.utils.set_random_seed(seed)
    backbone = GemmaBackbone(**tiny_backbone_kwargs(layout, **overrides))
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        if variable.path.endswith("scale"):
            # Non-zero scales, so the `1 + scale` convention is exercised.
            variable.assign(rng.normal(0, 0.5, variable.shape).astype("float32"))
    return backbone


@pytest.fixture(scope="session")
def tokenizer(vocab_proto):
    from keras_gemma import GemmaTokenizer

    return GemmaTokenizer(vocab_proto)


@pytest.fixture(scope="module", params=["mqa", "mha"])
def layout(request):
    return request.param


# In CI (`CI=true`) a skipped oracle (keras-hub, transformers, peft, ...) fails the run.
pytest_plugins = ["oracle_guard"]
