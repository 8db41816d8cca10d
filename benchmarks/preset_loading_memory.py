"""Peak resident memory of loading a full-size Gemma 2B checkpoint in bfloat16.

Writes a synthetic `gemma_2b_en`-shaped checkpoint (random bfloat16
weights, ~5 GB) in both layouts -- keras-hub's Keras preset layout and
Hugging Face's safetensors layout -- then loads each in a fresh subprocess
and reports the peak RSS (`VmHWM`) next to the weight bytes. keras-hub
loading the same Keras-layout files is measured beside it when installed.

Not part of CI: it needs ~10 GB of disk and a few minutes.

    KERAS_BACKEND=torch python benchmarks/preset_loading_memory.py [--directory DIR]
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
from _rss import rss_bytes

CASES = ("keras_gemma:keras", "keras_gemma:huggingface", "keras_hub:keras")


def _random_bfloat16(shape, rng):
    import ml_dtypes

    # Row blocks keep the float32 scratch small even for the embedding.
    out = np.empty(shape, ml_dtypes.bfloat16)
    flat = out.reshape(shape[0], -1) if len(shape) > 1 else out.reshape(1, -1)
    for start in range(0, flat.shape[0], 4096):
        block = flat[start : start + 4096]
        block[...] = (rng.standard_normal(block.shape, np.float32) * 0.02).astype(block.dtype)
    return out


def write_checkpoints(directory):
    """Writes the synthetic 2B checkpoint in both layouts, one tensor at a time."""
    import h5py
    import ml_dtypes

    from keras_gemma.checkpoints import _io
    from keras_gemma.checkpoints import _keras_layout
    from keras_gemma.presets import preset_config
    from keras_gemma.weight_names import huggingface_config
    from keras_gemma.weight_names import huggingface_tensors

    config = preset_config("gemma_2b_en")
    rng = np.random.default_rng(0)
    keras_dir, hf_dir = directory / "keras", directory / "huggingface"
    keras_dir.mkdir(parents=True, exist_ok=True)
    hf_dir.mkdir(parents=True, exist_ok=True)

    if not (keras_dir / "model.weights.h5").exists():
        _io.write_json(keras_dir / "config.json", _keras_layout.backbone_json(config, "bfloat16"))
        _io.write_json(
            keras_dir / "metadata.json",
            {"keras_version": "3", "parameter_count": config.num_parameters(), "tasks": []},
        )
        with h5py.File(keras_dir / "model.weights.h5.partial", "w") as file:
            for path, shape in config.weight_shapes().items():
                dataset = file.create_dataset(
                    _keras_layout.h5_dataset(path), data=_random_bfloat16(shape, rng)
                )
                dataset.attrs["dtype"] = "bfloat16"
        os.rename(keras_dir / "model.weights.h5.partial", keras_dir / "model.weights.h5")

    if not (hf_dir / "model.safetensors").exists():
        hf_config = {**huggingface_config(config), "torch_dtype": "bfloat16"}
        _io.write_json(hf_dir / "config.json", hf_config)
        shapes = config.weight_shapes()
        tensors = []
        for path, (name, to_hf, _) in huggingface_tensors(config).items():
            shape = to_hf(np.empty(shapes[path], np.int8)).shape
            tensors.append(
                (
                    name,
                    shape,
                    ml_dtypes.bfloat16,
                    lambda shape=shape: _random_bfloat16(shape, rng),
                )
            )
        _io.write_safetensors(hf_dir / "model.safetensors.partial", tensors)
        os.rename(hf_dir / "model.safetensors.partial", hf_dir / "model.safetensors")
    return config


def child(case, directory):
    """Loads one case and prints a JSON line of measurements."""
    library, layout = case.split(":")
    import keras  # noqa: F401  (imports before the baseline)

    if library == "keras_hub":
        import keras_hub
    else:
        from keras_gemma import GemmaBackbone
    baseline = rss_bytes(peak=False) / 2**20
    start = time.perf_counter()
    path = str(pathlib.Path(directory) / layout)
    if library == "keras_hub":
        backbone = keras_hub.models.GemmaBackbone.from_preset(path, dtype="bfloat16")
    else:
        backbone = GemmaBackbone.from_preset(path, dtype="bfloat16")
    seconds = time.perf_counter() - start
    weight_bytes = sum(int(np.prod(v.shape)) * 2 for v in backbone.weights)
    peak = rss_bytes() / 2**20
    print(
        json.dumps(
            {
                "case": case,
                "seconds": round(seconds, 1),
                "weights_mb": round(weight_bytes / 2**20),
                "baseline_rss_mb": round(baseline),
                "peak_rss_mb": round(peak),
                "after_rss_mb": round(rss_bytes(peak=False) / 2**20),
            }
        )
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directory", help="where to write the checkpoints (kept)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.directory)

    directory = pathlib.Path(args.directory or tempfile.mkdtemp(prefix="gemma_2b_synthetic_"))
    start = time.perf_counter()
    config = write_checkpoints(directory)
    print(
        f"wrote synthetic gemma_2b_en checkpoints to {directory} "
        f"in {time.perf_counter() - start:.0f} s"
    )
    weights_mb = config.num_parameters() * 2 / 2**20
    print(
        f"backend: {os.environ.get('KERAS_BACKEND', 'default')}; "
        f"bfloat16 weight bytes: {weights_mb:.0f} MiB"
    )
    print(
        f"{'case':26} {'load s':>7} {'baseline MiB':>13} {'peak MiB':>9} "
        f"{'peak-baseline / weights':>24} {'peak / weights':>15}"
    )
    for case in args.cases:
        if case.startswith("keras_hub"):
            try:
                import keras_hub  # noqa: F401
            except ImportError:
                print(f"{case:26} skipped: keras_hub is not installed")
                continue
        result = subprocess.run(
            [sys.executable, __file__, "--child", case, "--directory", str(directory)],
            capture_output=True,
            text=True,
        )
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode or not lines:
            print(f"{case:26} failed (exit {result.returncode}): {result.stderr[-2000:]}")
            continue
        r = json.loads(lines[-1])
        print(
            f"{case:26} {r['seconds']:7.1f} {r['baseline_rss_mb']:13d} {r['peak_rss_mb']:9d} "
            f"{(r['peak_rss_mb'] - r['baseline_rss_mb']) / weights_mb:24.2f} "
            f"{r['peak_rss_mb'] / weights_mb:15.2f}"
        )


if __name__ == "__main__":
    main()
