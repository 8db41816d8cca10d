"""Memory and step time of LoRA fine-tuning Gemma 2B in bfloat16 (not in CI).

Builds the 2B architecture with random weights (no download), enables rank-4
LoRA on query and value, and times training steps on random tokens. Prints the
adapter size computed from shapes, the peak resident memory of the process
against the weights' own bytes and, on a GPU, the peak device memory. The loss
is the default chunked cross-entropy; blocks are rematerialized unless
`--no-gradient-checkpointing`.

    KERAS_BACKEND=torch python benchmarks/lora_memory.py --sequence-length 1024
    python benchmarks/lora_memory.py --layers 2   # a quick smoke run on CPU
"""

import argparse
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


def _peak_rss():
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


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
    parser.add_argument("--sequence-length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True
    )
    args = parser.parse_args()

    config = GemmaConfig(**{**GEMMA_2B, "num_layers": args.layers})
    adapters = lora_parameter_count(config, args.rank)
    print(f"backend={keras.config.backend()} layers={args.layers} rank={args.rank}")
    print(f"base parameters: {config.num_parameters():,}")
    print(f"adapter parameters: {adapters:,} = {adapters * 4 / 2**20:.2f} MiB as float32")

    backbone = GemmaBackbone(**config.to_dict(), dtype="bfloat16")
    backbone.enable_lora(args.rank)
    backbone.gradient_checkpointing = args.gradient_checkpointing
    weight_bytes = sum(
        int(np.prod(v.shape)) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
        if keras.backend.standardize_dtype(v.dtype) != "bfloat16"
        else int(np.prod(v.shape)) * 2
        for v in backbone.weights
    )
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
    built_peak = _peak_rss()
    # Linux: "5" resets the peak-RSS counter, so the training peak is read
    # apart from building (random float32 initializers, then the cast).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    lm.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=0, callbacks=[timer])
    steady = timer.times[1:] or timer.times
    print(f"first step (compile): {timer.times[0]:.2f} s")
    print(f"step time: {np.median(steady):.3f} s (median of {len(steady)})")
    peak = _peak_rss()
    print(f"weights: {weight_bytes / 2**30:.2f} GiB (as stored, adapters included)")
    print(f"peak RSS while building: {built_peak / 2**30:.2f} GiB")
    print(f"peak RSS during fit: {peak / 2**30:.2f} GiB = {peak / weight_bytes:.2f}x the weights")
    device = peak_device_memory()
    if device:
        print(f"peak device memory: {device / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
