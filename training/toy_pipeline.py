"""The toy pipeline: tasks -> tokenizer -> pretraining -> SFT -> evaluation.

Usage:

    python training/toy_pipeline.py --stage 1 [--backend jax] [--output DIR]
        [--tiny] [--seed 0] [--save-preset presets/toy_gemma]

Stage 1 generates checkable tasks (`toy_tasks.py`), trains a SentencePiece
vocabulary on them (`train_tokenizer.py`), pretrains a small Gemma from
scratch on the tasks as plain text (`pretrain.py`), fine-tunes it in
Gemma's turn format with the loss on the model's turn (`sft.py`), and
measures held-out exact match by the checker for the pretrained model (asked
in the same turn format) and for the SFT model (`evaluate.py`). It prints a
table of exact match per task, the wall time of each stage and the backend,
and writes it to `DIR/table.md` and `DIR/table.json`.

Each step is one of the recipes, run in this process. Rerunning the same
command after a kill skips finished steps and resumes the interrupted one
from its last backup. `--tiny` runs a miniature (about a minute) for tests.
`--save-preset DIR` copies the SFT model there with a README naming the
command that made it. Stage 2 (RLHF) continues from `DIR/sft/preset`.
"""

import argparse
import json
import os
import pathlib
import platform
import shutil
import sys
import time

import evaluate
import pretrain
import recipe_common  # sets the backend from --backend before Keras loads
import sft
import toy_tasks
import train_tokenizer
from recipe_common import keras

# The full stage 1, tuned to finish in under 10 minutes on a 2-core CPU.
FULL = {
    "train_per_task": 4000,
    # Arithmetic is the hardest to generalise; it gets twice the examples.
    "train_scale": {"add": 2, "sub": 2},
    "heldout_per_task": 50,
    "vocabulary_size": 512,
    "model": ["--num-layers", "4", "--hidden-dim", "128", "--intermediate-dim", "512",
              "--num-query-heads", "4", "--num-key-value-heads", "1", "--head-dim", "32"],
    "pretrain": ["--steps", "800", "--steps-per-epoch", "100", "--batch-size", "32",
                 "--learning-rate", "3e-3", "--warmup-steps", "50"],
    "sft": ["--steps", "1200", "--steps-per-epoch", "100", "--batch-size", "64",
            "--learning-rate", "2e-3", "--warmup-steps", "30",
            "--packing", "--sequence-length", "96"],
    "sequence_length": 48,
}  # fmt: skip

# A miniature for CI: the same steps at toy sizes.
TINY = {
    "train_per_task": 200,
    "heldout_per_task": 8,
    "vocabulary_size": 320,
    "model": ["--num-layers", "1", "--hidden-dim", "32", "--intermediate-dim", "64",
              "--num-query-heads", "2", "--num-key-value-heads", "1", "--head-dim", "16"],
    "pretrain": ["--steps", "10", "--steps-per-epoch", "5", "--batch-size", "8",
                 "--learning-rate", "3e-3", "--warmup-steps", "2"],
    "sft": ["--steps", "10", "--steps-per-epoch", "5", "--batch-size", "8",
            "--learning-rate", "3e-3", "--warmup-steps", "2",
            "--packing", "--sequence-length", "64"],
    "sequence_length": 48,
}  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", type=int, choices=(1,), default=1)
    parser.add_argument("--backend", choices=recipe_common.BACKENDS, default=None)
    parser.add_argument("--output", type=pathlib.Path, help="default: training/runs/stage1-BACKEND")
    parser.add_argument("--tiny", action="store_true", help="a miniature, for tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=2, help="Keras progress bar verbosity")
    parser.add_argument("--save-preset", type=pathlib.Path, help="copy the SFT model here")
    return parser.parse_args(argv)


def run_stage1(args):
    sizes = TINY if args.tiny else FULL
    out = args.output
    seed = ["--seed", str(args.seed)]
    common = ["--verbose", str(args.verbose)]
    length = ["--sequence-length", str(sizes["sequence_length"])]
    times, cpu_times, results = {}, {}, {}

    def timed(name, function, *arguments):
        # CPU seconds (all threads) next to wall seconds: on a shared machine
        # the wall time depends on what else runs.
        start, cpu = time.perf_counter(), time.process_time()
        print(f"\n=== {name}", flush=True)
        value = function(*arguments)
        times[name] = time.perf_counter() - start
        cpu_times[name] = time.process_time() - cpu
        return value

    data = timed(
        "tasks",
        toy_tasks.write_splits,
        out / "data",
        sizes["train_per_task"],
        sizes["heldout_per_task"],
        args.seed,
        toy_tasks.TASKS,
        sizes.get("train_scale"),
    )
    vocabulary = timed(
        "tokenizer",
        train_tokenizer.main,
        ["--data", str(data["tokenizer"]), "--output", str(out / "tokenizer"),
         "--vocabulary-size", str(sizes["vocabulary_size"])],
    )  # fmt: skip
    pretrained = timed(
        "pretrain",
        pretrain.main,
        ["--vocabulary", str(vocabulary), "--data", str(data["pretrain"]),
         "--output", str(out / "pretrain"), *sizes["model"], *sizes["pretrain"], *length,
         *common, *seed],
    )  # fmt: skip
    evaluation = ["--tasks", str(data["heldout"]), "--text", str(data["heldout_text"])]
    results["pretrained"] = timed(
        "evaluate pretrained",
        evaluate.main,
        ["--preset", str(pretrained), "--output", str(out / "eval_pretrained"), *evaluation],
    )
    tuned = timed(
        "sft",
        sft.main,
        ["--preset", str(pretrained), "--data", str(data["train"]), "--output", str(out / "sft"),
         *sizes["sft"], *common, *seed],
    )  # fmt: skip
    results["sft"] = timed(
        "evaluate sft",
        evaluate.main,
        ["--preset", str(tuned), "--output", str(out / "eval_sft"), *evaluation],
    )
    return times, cpu_times, results, tuned


def format_table(times, cpu_times, results, backend, total):
    tasks = [t for t in results["sft"]["tasks"] if t != "all"] + ["all"]
    lines = [
        f"Stage 1, backend {backend}, {platform.processor() or platform.machine()}, "
        f"total {total:.0f}s",
        "",
        "| held-out exact match | " + " | ".join(tasks) + " | perplexity |",
        "|---" * (len(tasks) + 2) + "|",
    ]
    for name in ("pretrained", "sft"):
        row = results[name]
        cells = [f"{row['tasks'][t]['exact_match']:.0%}" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['perplexity']:.2f} |")
    lines += ["", "| stage | wall seconds | CPU seconds |", "|---|---|---|"]
    lines += [f"| {n} | {s:.0f} | {cpu_times[n]:.0f} |" for n, s in times.items()]
    lines.append(f"| total | {total:.0f} | {sum(cpu_times.values()):.0f} |")
    load = os.getloadavg()
    lines += ["", f"load average at the end (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / "
              f"{load[2]:.1f} on {os.cpu_count()} CPUs"]  # fmt: skip
    return "\n".join(lines)


def save_preset(tuned, destination, command, table, heldout):
    """Copies the SFT preset, its held-out questions, and a README with the
    command that made it."""
    if destination.exists():
        shutil.rmtree(destination)
    shutil.copytree(tuned, destination)
    # The questions training never saw travel with the model, for the demo
    # and for stage 2.
    shutil.copy(heldout, destination / "heldout.jsonl")
    (destination / "README.md").write_text(
        "# toy_gemma: a small Gemma trained by the toy pipeline, stage 1\n\n"
        "Pretrained from scratch on checkable toy tasks (addition, subtraction, sorting,\n"
        "reversing words, counting letters; `training/toy_tasks.py`), then fine-tuned in\n"
        "Gemma's turn format. Made by this command, from the repository root:\n\n"
        f"```bash\n{command}\n```\n\n"
        "Load it with `keras_gemma.GemmaCausalLM.from_preset(<this directory>)`.\n"
        "`heldout.jsonl` holds the held-out questions (never trained on) that the\n"
        "table below measures; `training/toy_tasks.py` checks answers to them.\n\n"
        f"{table}\n"
    )


def main(argv=None):
    args = parse_args(argv)
    backend = keras.config.backend()
    if args.output is None:
        suffix = "-tiny" if args.tiny else ""
        args.output = recipe_common.REPO_ROOT / "training" / "runs" / f"stage1-{backend}{suffix}"
    start = time.perf_counter()
    times, cpu_times, results, tuned = run_stage1(args)
    total = time.perf_counter() - start
    table = format_table(times, cpu_times, results, backend, total)
    print("\n" + table)
    (args.output / "table.md").write_text(table + "\n")
    summary = {
        "backend": backend,
        "seconds": times,
        "cpu_seconds": cpu_times,
        "total_seconds": total,
        "load_average": os.getloadavg(),
        **results,
    }
    (args.output / "table.json").write_text(json.dumps(summary, indent=1))
    if args.save_preset:
        command = f"KERAS_BACKEND={backend} .venv/bin/python training/toy_pipeline.py " + " ".join(
            sys.argv[1:] if argv is None else argv
        )
        save_preset(tuned, args.save_preset, command, table, args.output / "data" / "heldout.jsonl")
        print(f"saved the SFT model to {args.save_preset}")
    return summary


if __name__ == "__main__":
    main()
