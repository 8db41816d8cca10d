import pytest
from conftest import TINY_CONFIGS
from conftest import tiny_backbone_kwargs

from keras_gemma import GemmaBackbone
from keras_gemma import GemmaConfig

GEMMA_2B = dict(
    vocabulary_size=256000,
    num_layers=18,
    num_query_heads=8,
    num_key_value_heads=1,
    hidden_dim=2048,
    intermediate_dim=32768,
    head_dim=256,
)
GEMMA_7B = dict(
    vocabulary_size=256000,
    num_layers=28,
    num_query_heads=16,
    num_key_value_heads=16,
    hidden_dim=3072,
    intermediate_dim=49152,
    head_dim=256,
)


@pytest.mark.parametrize(
    "config, published", [(GEMMA_2B, 2_506_172_416), (GEMMA_7B, 8_537_680_896)]
)
def test_published_parameter_counts(config, published):
    # Counted from shapes: nothing of this size is allocated.
    assert GemmaConfig(**config).num_parameters() == published


@pytest.mark.parametrize("layout", sorted(TINY_CONFIGS))
def test_weight_shapes_match_built_backbone(layout):
    kwargs = tiny_backbone_kwargs(layout)
    backbone = GemmaBackbone(**kwargs)
    built = {v.path: tuple(v.shape) for v in backbone.weights}
    assert built == GemmaConfig(**kwargs).weight_shapes()
    assert backbone.count_params() == GemmaConfig(**kwargs).num_parameters()
    # Quantized in place, or built quantized: the same int8 variables.
    backbone.quantize("int8")
    quantized = {v.path: tuple(v.shape) for v in backbone.weights}
    assert quantized == GemmaConfig(**kwargs).weight_shapes("int8")
    rebuilt = GemmaBackbone(**kwargs, quantization_mode="int8")
    assert {v.path: tuple(v.shape) for v in rebuilt.weights} == quantized


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_query_heads=6, num_key_value_heads=4), "multiple of `num_key_value_heads`"),
        (dict(intermediate_dim=63), "must be even"),
        (dict(head_dim=7), "must be even"),
        (dict(num_layers=0), "positive integer"),
        (dict(hidden_dim=32.0), "positive integer"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_invalid_config_is_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        GemmaBackbone(**tiny_backbone_kwargs("mqa", **overrides))
