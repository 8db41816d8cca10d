"""Data-parallel training on the PyTorch backend under `torchrun`.

Keras has no `keras.distribution` for torch, so this does what
`DistributedDataParallel` does, for any Keras model: every process (one per
device) holds a full replica, trains on its own shard of each global batch,
and the gradients are averaged across processes (all-reduce) before the
optimizer step, so all replicas take identical steps. NCCL on GPU, gloo on CPU.

Example (`torchrun --nproc_per_node=2 train.py`, KERAS_BACKEND=torch):

    from keras_gemma import torch_distributed
    rank, world_size = torch_distributed.initialize()
    lm = GemmaCausalLM(backbone)
    lm.compile(...)
    x, y, w = torch_distributed.shard_batch((x, y, w))  # this rank's rows
    lm.fit(x, y, sample_weight=w, batch_size=global_batch // world_size,
           shuffle=False, callbacks=[torch_distributed.DataParallel()])

Gradients are averaged, so each rank's loss must be a mean over an equal
share of the global batch (Keras's default reduction over same-size shards).
Tensor (model) parallelism is not provided for torch.
"""

import os

import keras
import numpy as np


def _dist():
    if keras.config.backend() != "torch":
        raise RuntimeError(
            "keras_gemma.torch_distributed needs KERAS_BACKEND=torch; on JAX use "
            "keras.distribution (see keras_gemma.distribution)."
        )
    import torch.distributed as dist

    return dist


def initialize(backend=None):
    """Joins the process group that `torchrun` describes in the environment.

    Returns `(rank, world_size)`. `backend` defaults to NCCL when CUDA is
    available and gloo otherwise; on GPU each process uses `LOCAL_RANK`'s device.
    """
    dist = _dist()
    import torch

    if not dist.is_initialized():
        required = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        missing = [name for name in required if name not in os.environ]
        if missing:
            raise RuntimeError(
                f"Missing {missing} in the environment: launch with `torchrun "
                "--nproc_per_node=N script.py`, or call "
                "torch.distributed.init_process_group yourself."
            )
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def shard_batch(arrays, rank=None, world_size=None):
    """This rank's contiguous share of the leading axis of each array.

    Accepts an array or a (nested) tuple/list/dict of them; the leading size
    must divide by `world_size`.
    """
    if rank is None or world_size is None:
        dist = _dist()
        rank, world_size = dist.get_rank(), dist.get_world_size()

    def shard(x):
        x = np.asarray(x)
        if x.shape[0] % world_size:
            raise ValueError(
                f"A leading size of {x.shape[0]} does not split evenly over "
                f"{world_size} processes; pad or trim the data."
            )
        size = x.shape[0] // world_size
        return x[rank * size : (rank + 1) * size]

    return keras.tree.map_structure(shard, arrays)


class DataParallel(keras.callbacks.Callback):
    """Averages gradients across processes, and starts all replicas equal.

    At the start of `fit` the model's weights are broadcast from rank 0, and
    a hook on every trainable variable's torch parameter all-reduces its
    gradient as backpropagation produces it (so communication overlaps the
    rest of the backward pass, as in `DistributedDataParallel`). The hooks
    are removed when `fit` ends.

    The result is the gradient of the mean of the ranks' losses. Each rank's
    loss is a mean over its own target tokens, so this equals one process on
    the whole batch when every rank's batch holds the same number of target
    tokens (sum of `sample_weight`); with unequal counts a rank's tokens weigh
    in proportion to 1 / its count, as with `DistributedDataParallel`.
    """

    def __init__(self, broadcast_weights=True):
        super().__init__()
        self.broadcast_weights = broadcast_weights
        self._handles = []

    def on_train_begin(self, logs=None):
        dist = _dist()
        if not dist.is_initialized():
            raise RuntimeError("Call keras_gemma.torch_distributed.initialize() first.")
        world_size = dist.get_world_size()
        if self.broadcast_weights:
            for variable in self.model.weights:
                dist.broadcast(variable.value.data, src=0)

        def average(gradient):
            gradient = gradient.clone()
            dist.all_reduce(gradient)
            return gradient / world_size

        self._handles = [v.value.register_hook(average) for v in self.model.trainable_weights]

    def on_train_end(self, logs=None):
        for handle in self._handles:
            handle.remove()
        self._handles = []


__all__ = ["DataParallel", "initialize", "shard_batch"]
