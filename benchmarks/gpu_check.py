"""GPU check for JAX and PyTorch: logits parity, decode speed, a LoRA step.

    python benchmarks/gpu_check.py                   # both backends, 2B and 7B: minutes
    python benchmarks/gpu_check.py --backend torch --hbm-gb-s 3350   # an H100
    python benchmarks/gpu_check.py --quick           # tiny configs: a smoke run

Needs a CUDA build of the backend (`pip install "jax[cuda12]"`, a CUDA torch
wheel). Per backend, each part runs in its own process with `KERAS_BACKEND`
set (JAX cannot reset its peak memory within one):
1. Logits parity: a seeded tiny `GemmaCausalLM`, its weights carried by a
   .weights.h5 into a CPU-only process (`CUDA_VISIBLE_DEVICES=""`,
   `JAX_PLATFORMS=cpu`); max abs logit difference of GPU float32 (TF32 off,
   JAX matmul precision "float32") and GPU bfloat16 from CPU float32.
2. Decode speed: the 2B and 7B architectures (`keras_gemma.presets`), random
   bfloat16 weights, batch 1, a 32-token prompt, 64 new tokens, greedy; tok/s
   over the whole call, "decode" = 63 tokens over (64-token call - 1-token
   call), each the best of 3 (`gemma_2b_speed._timings`). Bound: `--hbm-gb-s`
   over the weight bytes; "of copy": the same from a measured 1 GiB
   device-to-device copy (x -> -x, read + write).
3. A LoRA step: 2B bfloat16, `enable_lora(4)`, 1 x 512 tokens; the median of
   3 `train_on_batch` steps after a warm-up step, and the peak GPU memory.
Prints one plain-text table per backend. Exit status: 1 on a FAIL or a failed
part; 3, with a one-line message, when a backend sees no GPU.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from _machine import describe_cpu

_TAG, NO_GPU = "@@", 3  # _TAG marks a child's answer among whatever else it prints
PROMPT, NEW_TOKENS, LORA_LENGTH, COPY_BYTES = 32, 64, 512, 2**30
TOLERANCES = {"float32": 1e-4, "bfloat16": 5e-2}
# --quick: each preset's vocabulary with tiny layers (7B keeps 4 key/value heads).
TINY = dict(num_layers=2, hidden_dim=128, intermediate_dim=512, head_dim=32, num_query_heads=4)


def _config(preset, quick):
    from keras_gemma.presets import preset_config

    config = preset_config(preset)
    if quick:
        kv = min(4, config.num_key_value_heads)
        config = dataclasses.replace(config, **TINY, num_key_value_heads=kv)
    return config.to_dict()


def _device(args):
    """The GPU's name; without one, a one-line message and exit 3."""
    import keras

    backend = keras.config.backend()
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
        why = "torch.cuda.is_available() is False"
        why += " (a CPU-only torch build)" if torch.version.cuda is None else ""
    else:
        import jax

        if jax.devices()[0].platform == "gpu":
            return f"{jax.devices()[0].device_kind}, jax {jax.__version__}"
        why = f"JAX sees only {jax.devices()} (is jax[cuda12] installed?)"
    if args.allow_cpu or args.child == "reference":
        return f"CPU, {backend} {sys.modules[backend].__version__}"
    print(_TAG + json.dumps({"error": f"gpu_check: no GPU visible to {backend}: {why}"}))
    sys.exit(NO_GPU)


def _model(config, dtype, lora_rank=None):
    import keras

    import keras_gemma

    keras.utils.set_random_seed(0)
    backbone = keras_gemma.GemmaBackbone(**config, dtype=dtype)
    if lora_rank:
        backbone.enable_lora(lora_rank)
    return keras_gemma.GemmaCausalLM(backbone)


def parity(args):
    """The GPU logits of a seeded tiny model, float32 and bfloat16, into
    `--dir`; as `--child reference`, the CPU float32 logits of its weights."""
    import contextlib

    import keras

    device, weights = _device(args), os.path.join(args.dir, "parity.weights.h5")
    config = {**_config("gemma_2b_en", quick=True), "vocabulary_size": 1024}
    token_ids = np.random.default_rng(0).integers(3, 1024, (2, 32), "int32")
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    precise = contextlib.nullcontext()
    if keras.config.backend() == "torch":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    else:
        import jax

        precise = jax.default_matmul_precision("float32")
    result = {"device": device, "keras": keras.__version__}
    for dtype in ("float32", "bfloat16") if args.child == "parity" else ("float32",):
        lm = _model(config, dtype)
        if dtype == "float32" and args.child == "parity":
            lm.save_weights(weights)
        else:
            lm.load_weights(weights)
        with precise if dtype == "float32" else contextlib.nullcontext():
            logits = np.asarray(keras.ops.convert_to_numpy(lm(inputs)), "float32")
        np.save(os.path.join(args.dir, f"{args.child}_{dtype}.npy"), logits)
        result.setdefault("max_logit", float(np.abs(logits).max()))
    return result


def decode(args):
    import keras
    from gemma_2b_speed import _inputs
    from gemma_2b_speed import _timings
    from gemma_2b_speed import model_weight_bytes

    _device(args)
    # GB/s read + written by a device-to-device `x -> -x` of 1 GiB, before the weights.
    x = keras.ops.ones((COPY_BYTES // (64 if args.allow_cpu else 1) // 4,), "float32")
    keras.ops.convert_to_numpy(keras.ops.negative(x)[:1])  # a warm-up; fetching a slice syncs
    start = time.perf_counter()
    for _ in range(10):
        y = keras.ops.negative(x)
    keras.ops.convert_to_numpy(y[:1])
    copy_gb_s = 10 * 2 * 4 * x.shape[0] / (time.perf_counter() - start) / 1e9
    del x, y
    lm = _model(_config(args.config, args.quick), "bfloat16")
    lm.compile(sampler="greedy")
    shape = argparse.Namespace(batch_size=1, prompt_length=PROMPT, new_tokens=NEW_TOKENS)
    inputs, one_token = _inputs(shape)
    first_s, seconds, one_token_s = _timings(
        lambda: lm.generate(inputs, stop_token_ids=None),
        lambda: lm.generate(one_token, stop_token_ids=None),
    )
    weight_bytes = model_weight_bytes(lm)
    decode_speed = (NEW_TOKENS - 1) / (seconds - one_token_s)
    return [weight_bytes / 1e9, NEW_TOKENS / seconds, decode_speed, copy_gb_s, first_s]


def lora(args):
    from _rss import rss_bytes
    from lora_memory import peak_device_memory

    _device(args)
    config = _config("gemma_2b_en", args.quick)
    lm = _model(config, "bfloat16", lora_rank=4)
    lm.compile()
    rng = np.random.default_rng(0)
    x, y = (rng.integers(3, config["vocabulary_size"], (1, LORA_LENGTH), "int32") for _ in "xy")
    x = {"token_ids": x, "padding_mask": np.ones_like(x)}
    times = []
    for _ in range(4):  # train_on_batch returns Python floats: each step is synced
        start = time.perf_counter()
        lm.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    peak = peak_device_memory()
    return [times, peak / 2**30 if peak else None, rss_bytes() / 1e9]


CHILDREN = {"parity": parity, "reference": parity, "decode": decode, "lora": lora}


def _run(kind, backend, args, config=None, cpu=False):
    command = [sys.executable, __file__, "--child", kind, "--dir", args.dir]
    command += ["--quick"] * args.quick + ["--allow-cpu"] * args.allow_cpu
    command += ["--config", config] if config else []
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    if cpu:
        env.update(CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    if kind != "parity":  # the first part, which alone speaks when there is no GPU
        print(f"[{backend}] {kind} {config or ''}...", file=sys.stderr, flush=True)
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    tagged = [line for line in result.stdout.splitlines() if line.startswith(_TAG)]
    if tagged:  # a list of numbers, or a dict (perhaps with an "error")
        return json.loads(tagged[-1][len(_TAG) :])
    print(result.stderr[-3000:], file=sys.stderr)
    last = (result.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return {"error": f"{kind} {config or ''} failed (exit {result.returncode}): {last}"}


def check_backend(backend, args):
    """Runs and prints one backend's table; its failures, None without a GPU."""
    info = _run("parity", backend, args)
    if "error" in info:
        print(info["error"], file=sys.stderr)
        return None if info["error"].startswith("gpu_check: no GPU") else 1
    reference, failures = _run("reference", backend, args, cpu=True), 0
    lines = [f"logits parity (tiny model, seeded; max |logit| {info['max_logit']:.2f})"]
    if "error" in reference:
        lines.append(f"  CPU reference {reference['error']}")
        failures += 1
    for dtype, tolerance in TOLERANCES.items() if "error" not in reference else ():
        gpu = np.load(os.path.join(args.dir, f"parity_{dtype}.npy"))
        diff = float(np.abs(gpu - np.load(os.path.join(args.dir, "reference_float32.npy"))).max())
        failures += diff > tolerance
        lines.append(
            f"  GPU {dtype:<8} vs CPU float32: max abs diff {diff:.2e} (tolerance "
            f"{tolerance:.0e})  {'PASS' if diff <= tolerance else 'FAIL'}"
        )
    star = "*" * args.quick
    lines += [
        f"decode: bfloat16, batch 1, prompt {PROMPT}, {NEW_TOKENS} new tokens, greedy; "
        f"bound = {args.hbm_gb_s:g} GB/s (--hbm-gb-s) / weight bytes",
        f"  {'config':<14}{'weights GB':>11}{'tok/s':>9}{'decode':>9}{'bound':>10}"
        f"{'of bound':>10}{'copy GB/s':>11}{'of copy':>9}{'first s':>9}",
    ]
    for preset in ("gemma_2b_en", "gemma_7b_en"):
        r = _run("decode", backend, args, config=preset)
        failures += "error" in r
        if "error" in r:
            lines.append(f"  {preset + star:<14}{r['error']}")
            continue
        weight_gb, speed, decode_speed, copy_gb_s, first_s = r
        bound = args.hbm_gb_s / weight_gb
        lines.append(
            f"  {preset + star:<14}{weight_gb:>11.3f}{speed:>9.1f}{decode_speed:>9.1f}"
            f"{bound:>10.1f}{decode_speed / bound:>10.1%}{copy_gb_s:>11.0f}"
            f"{decode_speed * weight_gb / copy_gb_s:>9.1%}{first_s:>9.1f}"
        )
    r = _run("lora", backend, args)
    failures += "error" in r
    lines.append(f"LoRA fit step: gemma_2b{star}, bfloat16, rank 4, batch 1 x {LORA_LENGTH} tokens")
    if "error" in r:
        lines.append(f"  {r['error']}")
    else:
        times, peak_gib, rss_gb = r
        peak = "n/a" if peak_gib is None else f"{peak_gib:.2f} GiB"
        lines.append(
            f"  step {np.median(times[1:]):.3f} s (median of 3; warm-up step {times[0]:.1f} s)"
            f", peak GPU memory {peak}, peak RSS {rss_gb:.1f} GB"
        )
    print(f"\n== {backend}: {info['device']}, keras {info['keras']} ==\nhost: {describe_cpu()}")
    print("\n".join(lines + ["(* --quick: tiny layers, the preset's vocabulary)"] * args.quick))
    return failures


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["jax", "torch", "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="tiny configs: a smoke run")
    parser.add_argument(
        "--hbm-gb-s",
        type=float,
        default=4800.0,
        help="HBM GB/s for the decode bound (default: an H200)",
    )
    # Hidden: the same code on a CPU (tiny configs), to test this script without a GPU.
    parser.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.quick = args.quick or args.allow_cpu
    if args.child:
        print(_TAG + json.dumps(CHILDREN[args.child](args)), flush=True)
        return
    backends = ["jax", "torch"] if args.backend == "all" else [args.backend]
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as args.dir:  # each backend rewrites it
        failures = [check_backend(backend, args) for backend in backends]
    sys.exit(NO_GPU if None in failures else int(any(failures)))


if __name__ == "__main__":
    main()
