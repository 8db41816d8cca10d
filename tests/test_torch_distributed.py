"""Torch data parallel: 2 gloo processes under torchrun equal one process on the whole batch.

The test launches this file as the worker script with
`python -m torch.distributed.run --standalone --nproc_per_node 2`.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "torch", reason="torch data parallel needs KERAS_BACKEND=torch"
)

# Eight different rows: each rank trains on its own four, so only averaging the
# gradients across ranks can reproduce one process on all eight. Both halves
# hold 23 target tokens: the loss is a mean over a batch's target tokens, and an
# average of per-rank means is the whole batch's mean only when the counts are
# equal (with 23 and 19 the embedding drifts by 0.045 in three steps; see
# `DataParallel`'s docstring).
TOKENS = np.array(
    [
        [2, 17, 99, 5, 250, 31, 7, 42],
        [2, 64, 3, 12, 9, 0, 0, 0],
        [2, 8, 8, 8, 100, 101, 0, 0],
        [2, 300, 200, 100, 50, 25, 12, 6],
        [2, 120, 7, 7, 66, 301, 19, 0],
        [2, 5, 44, 9, 11, 13, 0, 0],
        [2, 210, 211, 212, 213, 214, 215, 216],
        [2, 33, 150, 90, 4, 77, 0, 0],
    ],
    "int32",
)
STEPS = 3


def _data():
    mask = (TOKENS > 0).astype("int32")
    y = np.zeros_like(TOKENS)
    y[:, :-1] = TOKENS[:, 1:]
    weights = np.zeros(TOKENS.shape, "float32")
    weights[:, :-1] = mask[:, 1:]
    return {"token_ids": TOKENS, "padding_mask": mask}, y, weights


def _train(x, y, weights, batch_size, callbacks=(), lora=True, seed=0, learning_rate=0.5):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import make_backbone

    from keras_gemma import GemmaCausalLM

    backbone = make_backbone("mqa", seed=seed)
    if lora:
        backbone.enable_lora(2, target_layer_names=["query", "value", "ffw_linear"])
        keras.utils.set_random_seed(0)  # same adapter init everywhere
        for v in backbone.trainable_weights:
            v.assign(np.random.default_rng(1).normal(0, 0.1, v.shape).astype("float32"))
    lm = GemmaCausalLM(backbone)
    # Plain SGD: the update is proportional to the gradient, so a gradient
    # summed instead of averaged over ranks shows (Adam would normalise it away).
    lm.compile(optimizer=keras.optimizers.SGD(learning_rate))
    lm.fit(
        x,
        y,
        sample_weight=weights,
        batch_size=batch_size,
        epochs=STEPS,
        shuffle=False,
        verbose=0,
        callbacks=list(callbacks),
    )
    return {v.path: keras.ops.convert_to_numpy(v) for v in lm.weights}


def _worker(out_dir, lora):
    from keras_gemma import torch_distributed

    rank, world_size = torch_distributed.initialize()
    x, y, weights = torch_distributed.shard_batch(_data())
    # Rank 1 starts from other weights: the callback's broadcast must fix that.
    trained = _train(
        x,
        y,
        weights,
        batch_size=len(TOKENS) // world_size,
        callbacks=[torch_distributed.DataParallel()],
        lora=lora,
        seed=rank,
    )
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **trained)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_two_gloo_processes_match_one_process_on_the_whole_batch(tmp_path, lora):
    env = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            os.path.abspath(__file__),
            str(tmp_path),
            str(int(lora)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(2)]
    x, y, weights = _data()
    half = len(TOKENS) // 2
    assert weights[:half].sum() == weights[half:].sum()
    single = _train(x, y, weights, batch_size=len(TOKENS), lora=lora)
    assert ranks[0].keys() == single.keys()
    for path, value in single.items():
        np.testing.assert_array_equal(ranks[0][path], ranks[1][path], err_msg=path)
        np.testing.assert_allclose(ranks[0][path], value, atol=2e-5, err_msg=path)
    # The comparison has power: without the gradient exchange rank 0 would
    # train on its own rows alone; with the gradients summed instead of
    # averaged it would take twice the step. Both land far outside 2e-5.
    own_rows = _train(
        *keras.tree.map_structure(lambda a: a[:half], (x, y, weights)), batch_size=half, lora=lora
    )
    summed = _train(x, y, weights, batch_size=len(TOKENS), lora=lora, learning_rate=1.0)
    for wrong in (own_rows, summed):
        assert max(np.abs(wrong[path] - single[path]).max() for path in single) > 1e-3


if __name__ == "__main__":
    _worker(sys.argv[1], lora=bool(int(sys.argv[2])))
