"""Training throughput in real (non-padding) tokens per second, with and
without packing (`GemmaCausalLMPreprocessor(packing=True)`).

    KERAS_BACKEND=jax python benchmarks/packing_speed.py
    KERAS_BACKEND=torch python benchmarks/packing_speed.py --examples 48

The model is `fit_speed.py`'s small config (vocabulary 32000, 6 layers,
hidden 512, multi-query), float32, LoRA rank 4 on query and value, Adam. The
examples are random tokens whose lengths follow an instruction-tuning mix:
log-normal with a median of `--median` tokens (many short answers, a few
long ones), clipped to [8, sequence length + 1]; every token carries loss.
Unpacked, each example gets its own right-padded row, as the preprocessor
makes them without packing; packed, `pack` fills rows first-fit. Both runs
train on the same examples at the same batch size, and each round runs both
(alternating which goes first) after a warm-up batch each; tokens/s counts
positions with loss weight, per the median round.
"""

import argparse
import os
import statistics
import time
import types

import keras
import numpy as np
from _machine import describe_cpu
from fit_speed import CONFIG

from keras_gemma import GemmaBackbone
from keras_gemma import GemmaCausalLM
from keras_gemma import GemmaCausalLMPreprocessor


def lengths_of_instruction_mix(count, median, longest, rng):
    lengths = rng.lognormal(np.log(median), 0.9, count).round().astype(int)
    return np.clip(lengths, 8, longest)


def batches(inputs, labels, weights, batch_size):
    for start in range(0, len(labels), batch_size):
        rows = slice(start, start + batch_size)
        yield {k: v[rows] for k, v in inputs.items()}, labels[rows], weights[rows]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--median", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(describe_cpu())
    print(f"backend={keras.config.backend()} load average at start: {os.getloadavg()}")

    rng = np.random.default_rng(0)
    lengths = lengths_of_instruction_mix(args.examples, args.median, args.sequence_length + 1, rng)
    examples = [
        (rng.integers(3, CONFIG["vocabulary_size"], n).tolist(), [1.0] * n) for n in lengths
    ]
    # Only `pad_token_id` of the tokenizer is read when packing or padding ids.
    tokenizer = types.SimpleNamespace(pad_token_id=0)
    packer = GemmaCausalLMPreprocessor(tokenizer, args.sequence_length, packing=True)
    packed = packer.pack(examples)
    padder = GemmaCausalLMPreprocessor(tokenizer, args.sequence_length + 1)
    token_ids, padding_mask = padder._pad([ids for ids, _ in examples], args.sequence_length + 1)
    weights = padding_mask.astype("float32")
    unpacked = (
        {"token_ids": token_ids[:, :-1], "padding_mask": padding_mask[:, :-1]},
        token_ids[:, 1:],
        weights[:, 1:],
    )
    data = {"unpacked": unpacked, "packed": packed}
    real = {name: float(d[2].sum()) for name, d in data.items()}
    assert real["packed"] == real["unpacked"], real
    rows = {name: len(d[1]) for name, d in data.items()}
    print(
        f"{args.examples} examples, lengths median {int(np.median(lengths))}, mean "
        f"{lengths.mean():.0f}, max {lengths.max()}; {int(real['packed'])} real tokens; "
        f"rows of {args.sequence_length}: unpacked {rows['unpacked']}, packed {rows['packed']}"
    )

    keras.utils.set_random_seed(0)
    lm = GemmaCausalLM(GemmaBackbone(**CONFIG))
    lm.backbone.enable_lora(rank=4)
    lm.compile(optimizer=keras.optimizers.Adam(1e-4))
    for inputs, labels, sample_weight in data.values():  # compile both signatures
        x, y, w = next(batches(inputs, labels, sample_weight, args.batch_size))
        lm.train_on_batch(x, y, sample_weight=w)
    times = {name: [] for name in data}
    for round_index in range(args.rounds):
        order = list(data) if round_index % 2 == 0 else list(data)[::-1]
        for name in order:
            start = time.perf_counter()
            for x, y, w in batches(*data[name], args.batch_size):
                lm.train_on_batch(x, y, sample_weight=w)
            times[name].append(time.perf_counter() - start)
    speed = {name: real[name] / statistics.median(t) for name, t in times.items()}
    gains = [u / p for u, p in zip(times["unpacked"], times["packed"])]
    for name in data:
        print(
            f"{name:<9} {speed[name]:8.0f} real tokens/s ({statistics.median(times[name]):.1f} s)"
        )
    print(
        f"packing gain: {statistics.median(gains):.2f}x (rounds {min(gains):.2f}-{max(gains):.2f})"
    )
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
