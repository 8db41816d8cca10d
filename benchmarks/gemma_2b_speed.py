"""Gemma 2B architecture (random weights) generation speed and peak memory.

    python benchmarks/gemma_2b_speed.py                       # every backend, bfloat16
    python benchmarks/gemma_2b_speed.py --keras-hub           # + keras-hub and transformers
    python benchmarks/gemma_2b_speed.py --backend torch --quantize int8
    python benchmarks/gemma_2b_speed.py --backend torch --batch-size 8
    python benchmarks/gemma_2b_speed.py --int8-versus-bfloat16  # one process, interleaved

Batch 1 (`--batch-size`), a 32-token prompt, 8 new tokens, greedy; tokens/s
counts the new tokens of every row over the whole call (prefill included)
after one warm-up call. "decode" is the steady-state rate without the
prefill: the extra new tokens over the extra time, against a call that makes
one new token (each the best of 3 calls). Each model runs in its own
process; peak resident memory is that process's maximum RSS (the "base"
column is the RSS after imports, before any weights). The memory-bandwidth
bound is the tokens per step (the batch) times the bandwidth of a float32
matrix-vector product measured here with NumPy just before and after that
model's process, over the weight bytes each step reads.
With `--quantize int8` our model is quantized once and saved as an int8
preset (in `--int8-preset`), and the measured process loads that preset, as
a user serving int8 weights would. Not part of CI: it needs ~12 GB of memory
and minutes per backend.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from _machine import describe_cpu
from _rss import rss_bytes

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
    from keras_gemma.checkpoints import build_with_weights
    from keras_gemma.config import GemmaConfig

    rng = np.random.default_rng(0)
    loaders = {
        path: (lambda shape=shape: rng.standard_normal(shape, np.float32) * 0.02)
        for path, shape in GemmaConfig(**GEMMA_2B).weight_shapes().items()
    }
    return build_with_weights(lambda: cls(**GEMMA_2B, dtype=dtype), loaders)


def _rss_gb(peak=True):
    return rss_bytes(peak) / 1e9


def make_int8_preset(args):
    from keras_gemma import GemmaBackbone

    backbone = _random_backbone(GemmaBackbone, args.dtype)
    backbone.quantize("int8")
    backbone.save_to_preset(args.int8_preset)


def _prompt(args):
    length = args.prompt_length + args.new_tokens
    token_ids = np.zeros((args.batch_size, length), "int32")
    token_ids[:, : args.prompt_length] = np.random.default_rng(1).integers(
        3, 256000, (args.batch_size, args.prompt_length)
    )
    return token_ids


def _inputs(args):
    """The prompt padded for `--new-tokens`, and for one new token."""
    token_ids = _prompt(args)
    length = token_ids.shape[1]
    inputs = {
        "token_ids": token_ids,
        "padding_mask": np.broadcast_to(np.arange(length) < args.prompt_length, token_ids.shape),
    }
    one_token = {name: value[:, : args.prompt_length + 1] for name, value in inputs.items()}
    return inputs, one_token


def compare_int8(args, repeats=5):
    """Our bfloat16 and int8 models in one process, their calls interleaved,
    so the host's drift affects both alike: the int8/bfloat16 speed ratio
    that separate processes minutes apart measure only to +-15%. Decode time
    is the median over repeats of (call - one-token call), run back to back."""
    import keras

    from keras_gemma import GemmaBackbone
    from keras_gemma import GemmaCausalLM

    models = {
        "bfloat16": GemmaCausalLM(_random_backbone(GemmaBackbone, args.dtype)),
        "int8": GemmaCausalLM(GemmaBackbone.from_preset(args.int8_preset)),
    }
    inputs, one_token = _inputs(args)
    calls = {name: ([], []) for name in models}
    for lm in models.values():
        lm.compile(sampler="greedy")
        lm.generate(inputs, stop_token_ids=None)
        lm.generate(one_token, stop_token_ids=None)
    for repeat in range(repeats):
        for name in list(models)[:: 1 if repeat % 2 else -1]:
            for seconds, call_inputs in zip(calls[name], (inputs, one_token)):
                start = time.perf_counter()
                models[name].generate(call_inputs, stop_token_ids=None)
                seconds.append(time.perf_counter() - start)
    result = {"backend": keras.config.backend()}
    for name, (full, one) in calls.items():
        result[f"{name}_tokens_per_s"] = args.batch_size * args.new_tokens / np.median(full)
        decode_s = np.median(np.subtract(full, one))
        result[f"{name}_decode_tokens_per_s"] = args.batch_size * (args.new_tokens - 1) / decode_s
    return result


def model_weight_bytes(model):
    """Bytes of every weight of a Keras model, in its stored dtypes."""
    import keras

    return sum(
        int(np.prod(v.shape)) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
        for v in model.weights
    )


def _timings(generate, generate_one_token, repeats=3):
    """Seconds of the first call, and the best of `repeats` warm calls and
    warm one-token calls (this host's speed drifts by up to ~30% between
    minutes; the best is the least disturbed)."""
    start = time.perf_counter()
    generate()
    first_s = time.perf_counter() - start
    generate_one_token()  # its own warm-up: the cache may be shorter
    timings = [[], []]
    for _ in range(repeats):
        for seconds, call in zip(timings, (generate, generate_one_token)):
            start = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - start)
    return first_s, min(timings[0]), min(timings[1])


def measure_transformers(args):
    """Hugging Face transformers' GemmaForCausalLM, same architecture, bfloat16."""
    import torch
    import transformers

    from keras_gemma.config import GemmaConfig
    from keras_gemma.weight_names import huggingface_config

    base = _rss_gb(peak=False)
    torch.set_default_dtype(getattr(torch, args.dtype))  # weights made in bf16 directly
    config = transformers.GemmaConfig(**huggingface_config(GemmaConfig(**GEMMA_2B)))
    with torch.no_grad():
        model = transformers.GemmaForCausalLM(config).eval()
    prompt = torch.from_numpy(_prompt(args)[:, : args.prompt_length]).long()

    def generate(new_tokens=args.new_tokens):
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)

    first_s, seconds, one_token_s = _timings(generate, lambda: generate(1))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "backend": "torch",
        "library": "transformers",
        "quantize": None,
        "tokens_per_s": args.batch_size * args.new_tokens / seconds,
        "decode_tokens_per_s": args.batch_size * (args.new_tokens - 1) / (seconds - one_token_s),
        "first_call_s": first_s,
        "weight_gb": weight_bytes / 1e9,
        "base_rss_gb": base,
        "peak_rss_gb": _rss_gb(),
    }


def measure(args):
    import keras

    from keras_gemma import GemmaBackbone
    from keras_gemma import GemmaCausalLM

    base = _rss_gb(peak=False)
    start = time.perf_counter()
    if args.quantize and not args.keras_hub:
        lm = GemmaCausalLM(GemmaBackbone.from_preset(args.int8_preset))
    elif args.keras_hub:
        import keras_hub

        from keras_gemma.weight_names import assign_to_keras_hub

        ours = _random_backbone(GemmaBackbone, args.dtype)
        backbone = keras_hub.models.GemmaBackbone(**GEMMA_2B, dtype=args.dtype)
        assign_to_keras_hub(ours, backbone)
        del ours
        lm = keras_hub.models.GemmaCausalLM(backbone)
    else:
        lm = GemmaCausalLM(_random_backbone(GemmaBackbone, args.dtype))
    if args.quantize and args.keras_hub:
        lm.quantize(args.quantize)
    lm.compile(sampler="greedy")
    build_s = time.perf_counter() - start
    inputs, one_token = _inputs(args)
    first_s, seconds, one_token_s = _timings(
        lambda: lm.generate(inputs, stop_token_ids=None),
        lambda: lm.generate(one_token, stop_token_ids=None),
    )
    weight_bytes = model_weight_bytes(lm)
    return {
        "backend": keras.config.backend(),
        "library": "keras-hub" if args.keras_hub else "keras_gemma",
        "quantize": args.quantize,
        "tokens_per_s": args.batch_size * args.new_tokens / seconds,
        "decode_tokens_per_s": args.batch_size * (args.new_tokens - 1) / (seconds - one_token_s),
        "first_call_s": first_s,
        "build_s": build_s,
        "weight_gb": weight_bytes / 1e9,
        "base_rss_gb": base,
        "peak_rss_gb": _rss_gb(),
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["jax", "torch", "tensorflow"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantize", choices=["int8"])
    parser.add_argument(
        "--keras-hub",
        action="store_true",
        help="also measure keras-hub on each backend, and transformers (bfloat16 only)",
    )
    parser.add_argument("--int8-preset", help="default: /tmp/keras_gemma_2b_int8_<dtype>")
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--int8-versus-bfloat16",
        action="store_true",
        help="our int8 and bfloat16 in one process, interleaved (torch unless --backend)",
    )
    parser.add_argument(
        "--child", choices=["measure", "transformers", "int8-preset", "compare-int8"]
    )
    args = parser.parse_args()
    args.int8_preset = args.int8_preset or f"/tmp/keras_gemma_2b_int8_{args.dtype}"
    if args.child:
        child = {
            "measure": measure,
            "transformers": measure_transformers,
            "int8-preset": make_int8_preset,
            "compare-int8": compare_int8,
        }[args.child]
        print(json.dumps(child(args)))
        return

    def run(child, backend, *extra):
        command = [sys.executable, __file__, "--child", child, "--dtype", args.dtype]
        command += [
            "--prompt-length",
            str(args.prompt_length),
            "--batch-size",
            str(args.batch_size),
        ]
        command += ["--new-tokens", str(args.new_tokens), "--int8-preset", args.int8_preset]
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        result = subprocess.run(command + list(extra), env=env, capture_output=True, text=True)
        if result.returncode:
            print(f"{backend} {child} {' '.join(extra)} failed:\n{result.stderr[-2000:]}")
            return None
        return json.loads(result.stdout.strip().splitlines()[-1])

    if (args.quantize or args.int8_versus_bfloat16) and not os.path.isdir(args.int8_preset):
        run("int8-preset", "torch")
    if args.int8_versus_bfloat16:
        row = run("compare-int8", args.backend or "torch")
        print(json.dumps(row))
        print(f"\n{describe_cpu()}; batch {args.batch_size}; medians of 5 interleaved calls")
        print(f"{'backend':<11}{'':<10}{'bfloat16':>9}{'int8':>7}{'ratio':>7}")
        for label, key in (("tok/s", "tokens_per_s"), ("decode", "decode_tokens_per_s")):
            bf16, int8 = row[f"bfloat16_{key}"], row[f"int8_{key}"]
            print(f"{row['backend']:<11}{label:<10}{bf16:>9.2f}{int8:>7.2f}{int8 / bf16:>7.2f}")
        return
    backends = [args.backend] if args.backend else ["jax", "torch", "tensorflow"]
    quantize = ["--quantize", args.quantize] if args.quantize else []
    runs = [
        ("measure", b, *quantize, *(["--keras-hub"] * kh))
        for b in backends
        for kh in ([False, True] if args.keras_hub else [False])
    ]
    if args.keras_hub and not args.quantize and "torch" in backends:
        runs.append(("transformers", "torch"))
    rows, bandwidths = [], []
    for child, backend, *extra in runs:
        # Measured beside each model (the host's bandwidth drifts), in this
        # process (a 268 MB matrix would count in the model's peak memory).
        before = measure_bandwidth()
        row = run(child, backend, *extra)
        print(json.dumps(row), flush=True)
        if row is not None:
            row["bandwidth_gb_s"] = (before + measure_bandwidth()) / 2
            rows.append(row)
            bandwidths.append(row["bandwidth_gb_s"])
    print(f"\n{describe_cpu()}; batch {args.batch_size}")
    if bandwidths:
        print(
            "memory bandwidth (float32 GEMV, NumPy, before and after each model): "
            f"{min(bandwidths):.1f}-{max(bandwidths):.1f} GB/s"
        )
    print(
        f"{'backend':<11}{'library':<13}{'tok/s':>7}{'decode':>7}{'bound':>7}{'of bound':>9}"
        f"{'vs kh':>7}{'peak GB':>9}{'base GB':>8}{'peak/weights':>13}{'(peak-base)/w':>14}"
        f"{'first s':>8}"
    )
    keras_hub_speed = {r["backend"]: r["tokens_per_s"] for r in rows if r["library"] == "keras-hub"}
    for r in rows:
        # Every step reads the weights once, whatever the batch.
        bound = args.batch_size * r["bandwidth_gb_s"] / r["weight_gb"]
        versus = r["tokens_per_s"] / keras_hub_speed.get(r["backend"], float("nan"))
        print(
            f"{r['backend']:<11}{r['library']:<13}{r['tokens_per_s']:>7.2f}"
            f"{r['decode_tokens_per_s']:>7.2f}{bound:>7.2f}"
            f"{r['decode_tokens_per_s'] / bound:>9.0%}{versus:>7.2f}{r['peak_rss_gb']:>9.1f}"
            f"{r['base_rss_gb']:>8.1f}{r['peak_rss_gb'] / r['weight_gb']:>13.2f}"
            f"{(r['peak_rss_gb'] - r['base_rss_gb']) / r['weight_gb']:>14.2f}"
            f"{r['first_call_s']:>8.1f}"
        )


if __name__ == "__main__":
    main()
