"""Small-config generation speed: keras_gemma beside keras-hub, same weights,
same run, every backend.

    python benchmarks/generation_speed.py            # all three backends
    python benchmarks/generation_speed.py --backend torch --runs 5

Config (from the project's issues): vocabulary 32000, 6 layers, 8 query heads,
1 key/value head, hidden 512, intermediate 4096, head dim 64, float32.
Greedy, batch 1, a 32-token prompt, 32 new tokens; tokens/s counts new tokens
over the whole call (prefill included), median of `--runs` after a warm-up
call whose time (compilation included) is reported as "first call".
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _machine import describe_cpu

CONFIG = dict(
    vocabulary_size=32000,
    num_layers=6,
    num_query_heads=8,
    num_key_value_heads=1,
    hidden_dim=512,
    intermediate_dim=4096,
    head_dim=64,
)
PROMPT_LENGTH, NEW_TOKENS = 32, 32
PREFILL_LENGTH = 512


def _time_calls(generate, runs):
    start = time.perf_counter()
    generate()
    first = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        generate()
        times.append(time.perf_counter() - start)
    return first, NEW_TOKENS / statistics.median(times)


def _prefill_rate(lm, runs):
    """Tokens/s of a 512-token prompt's prefill (plus one decoded token)."""
    import numpy as np

    token_ids = np.zeros((1, PREFILL_LENGTH + 1), "int32")
    token_ids[0, :PREFILL_LENGTH] = np.random.default_rng(1).integers(3, 32000, PREFILL_LENGTH)
    inputs = {"token_ids": token_ids, "padding_mask": (token_ids > 0).astype("int32")}
    lm.generate(inputs, stop_token_ids=None)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        lm.generate(inputs, stop_token_ids=None)
        times.append(time.perf_counter() - start)
    return PREFILL_LENGTH / statistics.median(times)


def measure(runs, batch_size):
    import keras
    import numpy as np

    from keras_gemma import GemmaBackbone
    from keras_gemma import GemmaCausalLM
    from keras_gemma.weight_names import assign_to_keras_hub

    keras.utils.set_random_seed(0)
    backbone = GemmaBackbone(**CONFIG)
    ours = GemmaCausalLM(backbone)
    ours.compile(sampler="greedy")
    length = PROMPT_LENGTH + NEW_TOKENS
    token_ids = np.zeros((batch_size, length), "int32")
    token_ids[:, :PROMPT_LENGTH] = np.random.default_rng(0).integers(3, 32000, PROMPT_LENGTH)
    inputs = {
        "token_ids": token_ids,
        "padding_mask": (np.arange(length) < PROMPT_LENGTH)[None]
        .repeat(batch_size, 0)
        .astype("int32"),
    }
    results = {"backend": keras.config.backend(), "batch_size": batch_size}
    first, speed = _time_calls(lambda: ours.generate(inputs, stop_token_ids=None), runs)
    results.update(ours_first_s=first, ours_tokens_per_s=speed * batch_size)
    ours_tokens = ours.generate(inputs, stop_token_ids=None)["token_ids"]
    results["ours_prefill_tokens_per_s"] = _prefill_rate(ours, runs)
    try:
        import keras_hub
    except ImportError:
        return results
    reference = keras_hub.models.GemmaBackbone(**CONFIG)
    assign_to_keras_hub(backbone, reference)
    theirs = keras_hub.models.GemmaCausalLM(reference)
    theirs.compile(sampler="greedy")
    first, speed = _time_calls(lambda: theirs.generate(inputs, stop_token_ids=None), runs)
    results.update(keras_hub_first_s=first, keras_hub_tokens_per_s=speed * batch_size)
    theirs_tokens = keras.ops.convert_to_numpy(
        theirs.generate(inputs, stop_token_ids=None)["token_ids"]
    )
    results["same_tokens"] = bool((np.asarray(theirs_tokens) == ours_tokens).all())
    results["keras_hub_prefill_tokens_per_s"] = _prefill_rate(theirs, runs)
    return results


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["jax", "torch", "tensorflow"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend  # before anything imports Keras
        print(json.dumps(measure(args.runs, args.batch_size)))
        return
    rows = []
    for backend in ("jax", "torch", "tensorflow"):
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        command = [
            sys.executable,
            __file__,
            "--backend",
            backend,
            "--runs",
            str(args.runs),
            "--batch-size",
            str(args.batch_size),
        ]
        output = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(output.stdout.strip().splitlines()[-1]))
    best_reference = max(r.get("keras_hub_tokens_per_s", 0) for r in rows)
    print(
        f"batch {args.batch_size}, prompt {PROMPT_LENGTH}, {NEW_TOKENS} new tokens, float32, greedy"
    )
    print(f"(prefill: tokens/s of a {PREFILL_LENGTH}-token prompt, batch 1)")
    print(describe_cpu())
    print(
        f"{'backend':<11}{'ours tok/s':>11}{'keras-hub':>11}{'ratio':>8}{'vs best kh':>11}"
        f"{'first call (ours/kh)':>23}  same tokens  prefill ours/kh"
    )
    for r in rows:
        kh = r.get("keras_hub_tokens_per_s", float("nan"))
        print(
            f"{r['backend']:<11}{r['ours_tokens_per_s']:>11.1f}{kh:>11.1f}"
            f"{r['ours_tokens_per_s'] / kh:>8.2f}{r['ours_tokens_per_s'] / best_reference:>11.2f}"
            f"{r['ours_first_s']:>12.1f}s /{r.get('keras_hub_first_s', float('nan')):>6.1f}s"
            f"  {str(r.get('same_tokens')):<11}"
            f"  {r['ours_prefill_tokens_per_s']:.0f}/"
            f"{r.get('keras_hub_prefill_tokens_per_s', 0):.0f}"
        )


if __name__ == "__main__":
    main()
