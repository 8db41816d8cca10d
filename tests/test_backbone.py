import keras
import numpy as np
import pytest
from conftest import make_backbone
from helpers import assert_config_round_trip
from helpers import to_numpy

from keras_gemma import GemmaBackbone
from keras_gemma import GemmaCausalLM
from keras_gemma import GemmaCausalLMPreprocessor

INPUTS = {
    "token_ids": np.array([[2, 10, 11, 12, 13, 14], [2, 20, 21, 0, 0, 0]], "int32"),
    "padding_mask": np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], "int32"),
}


def test_config_round_trip(layout):
    backbone = make_backbone(layout)
    clone = assert_config_round_trip(backbone)
    assert clone.config == backbone.config


def test_keras_file_round_trip_gives_identical_outputs(tmp_path, tokenizer):
    lm = GemmaCausalLM(make_backbone("mqa"), GemmaCausalLMPreprocessor(tokenizer, 16))
    path = tmp_path / "model.keras"
    lm.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, GemmaCausalLM)
    np.testing.assert_array_equal(to_numpy(restored(INPUTS)), to_numpy(lm(INPUTS)))
    assert restored.preprocessor.tokenizer.proto == tokenizer.proto


def test_right_padding_does_not_change_real_positions():
    backbone = make_backbone("mha")
    padded = to_numpy(backbone(INPUTS))
    alone = to_numpy(
        backbone({"token_ids": INPUTS["token_ids"][1:, :3], "padding_mask": np.ones((1, 3))})
    )
    np.testing.assert_allclose(padded[1, :3], alone[0], atol=1e-5)


def test_cached_decoding_equals_full_recomputation(layout):
    """Logits of each position fed one at a time through the cache equal the
    full forward pass over the same sequence."""
    backbone = make_backbone(layout)
    lm = GemmaCausalLM(backbone)
    token_ids = INPUTS["token_ids"][:1]
    full = to_numpy(lm({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}))
    cache = backbone.empty_cache(1, 8)
    hidden, cache = backbone.compute_hidden_states(token_ids[:, :2], cache=cache)
    steps = [to_numpy(lm.compute_logits(hidden))[:, i] for i in range(2)]
    for i in range(2, token_ids.shape[1]):
        hidden, cache = backbone.compute_hidden_states(
            token_ids[:, i : i + 1], cache=cache, cache_update_index=i
        )
        steps.append(to_numpy(lm.compute_logits(hidden))[:, 0])
    np.testing.assert_allclose(np.stack(steps, axis=1), full, atol=1e-4)


def test_bfloat16_backbone_runs_in_bfloat16():
    backbone = make_backbone("mqa", dtype="bfloat16")
    out = backbone(INPUTS)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert all(keras.backend.standardize_dtype(v.dtype) == "bfloat16" for v in backbone.weights)
    float32 = make_backbone("mqa")
    for low, high in zip(backbone.weights, float32.weights):
        # The same (bfloat16) weights in both, so only the compute rounds.
        low.assign(keras.ops.cast(high, "bfloat16"))
        high.assign(keras.ops.cast(low, "float32"))
    low_out = to_numpy(keras.ops.cast(backbone(INPUTS), "float32"))
    high_out = to_numpy(float32(INPUTS))
    assert not np.array_equal(low_out, high_out)
    # Each bfloat16 rounding errs by at most u = 2**-8 relative; the residual
    # stream carries some twenty of them in series through two blocks. Measured
    # on the three backends and both layouts: at most 5.1 u times the largest
    # hidden value (~4). The bound allows 8 u, so an error the size of one
    # float32-only step done wrongly (a sign, a missing `1 +`) is far outside it.
    np.testing.assert_allclose(low_out, high_out, atol=8 * 2**-8 * np.abs(high_out).max())


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="multiple of"):
        GemmaBackbone(100, 1, 3, 2, 16, 32, 8)


@pytest.mark.skipif(keras.config.backend() == "tensorflow", reason="about the other backends")
def test_building_and_generating_never_import_tensorflow():
    # Keras's `serialize` imports TensorFlow where it is installed (as it is
    # here): +0.5 GB resident on a JAX or PyTorch user's process. A fresh
    # process, since the suite itself imports TensorFlow through keras-hub.
    import os
    import subprocess
    import sys

    script = (
        "import sys, numpy as np\n"
        "from keras_gemma import GemmaBackbone, GemmaCausalLM\n"
        "lm = GemmaCausalLM(GemmaBackbone(vocabulary_size=64, num_layers=1, num_query_heads=2,"
        " num_key_value_heads=1, hidden_dim=8, intermediate_dim=16, head_dim=4))\n"
        "lm.generate({'token_ids': np.array([[2, 5, 0]]), 'padding_mask': np.array([[1, 1, 0]])},"
        " stop_token_ids=None)\n"
        "lm.quantize('int8')\n"
        "print('tensorflow' in sys.modules)\n"
    )
    environment = {**os.environ, "KERAS_BACKEND": keras.config.backend()}
    result = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False"
