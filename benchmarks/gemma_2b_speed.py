"""Gemma 2B architecture (random weights) generation speed and peak memory.

    python benchmarks/gemma_2b_speed.py                       # every backend, bfloat16
    python benchmarks/gemma_2b_speed.py --backend torch --quantize int8
    python benchmarks/gemma_2b_speed.py --keras-hub           # keras-hub beside, same run

Batch 1, a 32-token prompt, 8 new tokens, greedy; tokens/s counts new tokens
over the whole call (prefill included) after one warm-up call. Peak resident
memory is the process's maximum RSS. The memory-bandwidth bound is the
weight bytes each token reads, divided by the bandwidth of a float32
matrix-vector product measured here with NumPy. Not part of CI: it needs
~10 GB of memory and minutes per backend.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from keras_gemma.presets import preset_config

# The architecture from the preset table, the one place it is written down.
GEMMA_2B = preset_config("gemma_2b_en").to_dict()


def measure_bandwidth():
    """GB/s of weight bytes read by a float32 GEMV (as decoding does)."""
    matrix = np.random.default_rng(0).standard_normal((16384, 4096), dtype=np.float32)
    vector = np.ones(4096, np.float32)
    matrix @ vector
    start = time.perf_counter()
    for _ in range(20):
        matrix @ vector
    return 20 * matrix.nbytes / (time.perf_counter() - start) / 1e9


def _random_backbone(cls, dtype):
    """A 2B backbone whose weights come straight from a NumPy generator."""
    from keras_gemma.checkpoints._io import build_with_weights
    from keras_gemma.config import GemmaConfig

    rng = np.random.default_rng(0)
    loaders = {
        path: (lambda shape=shape: rng.standard_normal(shape, np.float32) * 0.02)
        for path, shape in GemmaConfig(**GEMMA_2B).weight_shapes().items()
    }
    return build_with_weights(lambda: cls(**GEMMA_2B, dtype=dtype), loaders)


def measure(args):
    import keras

    from keras_gemma import GemmaBackbone
    from keras_gemma import GemmaCausalLM

    start = time.perf_counter()
    if args.keras_hub:
        import keras_hub

        from keras_gemma.weight_names import keras_hub_path

        ours = _random_backbone(GemmaBackbone, args.dtype)
        backbone = keras_hub.models.GemmaBackbone(**GEMMA_2B, dtype=args.dtype)
        theirs = {v.path: v for v in backbone.weights}
        for variable in ours.weights:
            theirs[keras_hub_path(variable.path)].assign(variable)
        del ours, theirs
        lm = keras_hub.models.GemmaCausalLM(backbone)
    else:
        lm = GemmaCausalLM(_random_backbone(GemmaBackbone, args.dtype))
    if args.quantize:
        lm.quantize(args.quantize)
    lm.compile(sampler="greedy")
    build_s = time.perf_counter() - start
    length = args.prompt_length + args.new_tokens
    token_ids = np.zeros((1, length), "int32")
    token_ids[0, : args.prompt_length] = np.random.default_rng(1).integers(
        3, 256000, args.prompt_length
    )
    inputs = {
        "token_ids": token_ids,
        "padding_mask": (np.arange(length) < args.prompt_length)[None].astype("int32"),
    }
    start = time.perf_counter()
    lm.generate(inputs, stop_token_ids=None)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    lm.generate(inputs, stop_token_ids=None)
    seconds = time.perf_counter() - start
    weight_bytes = sum(
        int(np.prod(v.shape)) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
        for v in lm.weights
    )
    return {
        "backend": keras.config.backend(),
        "library": "keras-hub" if args.keras_hub else "keras_gemma",
        "quantize": args.quantize,
        "tokens_per_s": args.new_tokens / seconds,
        "first_call_s": first_s,
        "build_s": build_s,
        "weight_gb": weight_bytes / 1e9,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["jax", "torch", "tensorflow"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantize", choices=["int8"])
    parser.add_argument("--keras-hub", action="store_true", help="also measure keras-hub")
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    bandwidth = measure_bandwidth()
    backends = [args.backend] if args.backend else ["jax", "torch", "tensorflow"]
    rows = []
    for backend in backends:
        for keras_hub in [False, True] if args.keras_hub else [False]:
            command = [
                sys.executable,
                __file__,
                "--child",
                "--dtype",
                args.dtype,
                "--prompt-length",
                str(args.prompt_length),
                "--new-tokens",
                str(args.new_tokens),
            ]
            command += ["--quantize", args.quantize] if args.quantize else []
            command += ["--keras-hub"] if keras_hub else []
            env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
            result = subprocess.run(command, env=env, capture_output=True, text=True)
            if result.returncode:
                library = "keras-hub" if keras_hub else "keras_gemma"
                print(f"{backend} {library} failed:\n{result.stderr[-2000:]}")
                continue
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nmemory bandwidth (float32 GEMV, NumPy): {bandwidth:.1f} GB/s")
    print(
        f"{'backend':<11}{'library':<12}{'tok/s':>7}{'bound':>7}{'of bound':>9}"
        f"{'peak GB':>9}{'peak/weights':>13}{'first s':>8}"
    )
    for r in rows:
        bound = bandwidth / r["weight_gb"]
        print(
            f"{r['backend']:<11}{r['library']:<12}{r['tokens_per_s']:>7.2f}{bound:>7.2f}"
            f"{r['tokens_per_s'] / bound:>9.0%}{r['peak_rss_gb']:>9.1f}"
            f"{r['peak_rss_gb'] / r['weight_gb']:>13.2f}{r['first_call_s']:>8.1f}"
        )


if __name__ == "__main__":
    main()
