"""Memory and step time of LoRA fine-tuning Gemma 2B in bfloat16 (not in CI).

Builds the 2B architecture with random weights (no download), enables rank-4
LoRA on query and value, and times training steps on random tokens. Prints the
adapter size computed from shapes, the peak resident memory of the process
and, on a GPU, the peak device memory.

    KERAS_BACKEND=jax python benchmarks/lora_memory.py --batch-size 1 --sequence-length 256
    python benchmarks/lora_memory.py --layers 2   # a quick smoke run on CPU
"""

import argparse
import resource
import time

import keras
import numpy as np

from keras_gemma import GemmaBackbone
from keras_gemma import GemmaCausalLM
from keras_gemma import GemmaConfig
from keras_gemma.lora import lora_parameter_count
from keras_gemma.presets import preset_config

# The architecture from the preset table, the one place it is written down.
GEMMA_2B = preset_config("gemma_2b_en").to_dict()


def peak_device_memory():
    backend = keras.config.backend()
    try:
        if backend == "torch":
            import torch

            if torch.cuda.is_available():
                return torch.cuda.max_memory_allocated()
        if backend == "jax":
            import jax

            stats = jax.devices()[0].memory_stats() or {}
            return stats.get("peak_bytes_in_use")
        if backend == "tensorflow":
            import tensorflow as tf

            if tf.config.list_physical_devices("GPU"):
                return tf.config.experimental.get_memory_info("GPU:0")["peak"]
    except Exception:  # noqa: BLE001 - a benchmark reports what it can
        return None
    return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    config = GemmaConfig(**{**GEMMA_2B, "num_layers": args.layers})
    adapters = lora_parameter_count(config, args.rank)
    print(f"backend={keras.config.backend()} layers={args.layers} rank={args.rank}")
    print(f"base parameters: {config.num_parameters():,}")
    print(f"adapter parameters: {adapters:,} = {adapters * 4 / 2**20:.2f} MiB as float32")

    backbone = GemmaBackbone(**config.to_dict(), dtype="bfloat16")
    backbone.enable_lora(args.rank)
    lm = GemmaCausalLM(backbone)
    lm.compile(optimizer=keras.optimizers.Adam(1e-4))
    rng = np.random.default_rng(0)
    shape = (args.batch_size * (args.steps + 1), args.sequence_length)
    x = {
        "token_ids": rng.integers(3, config.vocabulary_size, shape).astype("int32"),
        "padding_mask": np.ones(shape, "int32"),
    }
    y = rng.integers(3, config.vocabulary_size, shape).astype("int32")

    class Timer(keras.callbacks.Callback):
        times = []

        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self.start)

    timer = Timer()
    lm.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=0, callbacks=[timer])
    steady = timer.times[1:] or timer.times
    print(f"first step (compile): {timer.times[0]:.2f} s")
    print(f"step time: {np.median(steady):.3f} s (median of {len(steady)})")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    device = peak_device_memory()
    if device:
        print(f"peak device memory: {device / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
