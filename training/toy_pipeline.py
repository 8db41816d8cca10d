"""The toy pipeline: tasks -> tokenizer -> pretraining -> SFT (stage 1)
-> preference pairs -> reward model -> RLHF and DPO (stage 2) -> evaluation.

Usage:

    python training/toy_pipeline.py --stage 1|2 [--backend jax] [--output DIR]
        [--tiny] [--seed 0] [--save-preset presets/toy_gemma]

Stage 1 generates checkable tasks (`toy_tasks.py`), trains a SentencePiece
vocabulary on them (`train_tokenizer.py`), pretrains a small Gemma from
scratch on the tasks as plain text (`pretrain.py`), fine-tunes it in
Gemma's turn format with the loss on the model's turn (`sft.py`), and
measures held-out exact match by the checker for the pretrained model (asked
in the same turn format) and for the SFT model (`evaluate.py`). It prints a
table of exact match per task, the wall time of each stage and the backend,
and writes it to `DIR/table.md` and `DIR/table.json`.

Stage 2 (`--stage 2` runs stage 1 first, skipping what is done) samples
answers from the SFT model and lets the checker judge them into preference
pairs (`preference_pairs.py`: chosen right or closer, rejected wrong),
trains a Bradley–Terry reward model on them (`reward_model.py`, measured by
pairwise accuracy on pairs from the held-out questions), then improves the
SFT model three ways: RLHF (RLOO with a KL penalty toward SFT, `rlhf.py`)
with the learned reward model, RLHF with the checker itself as the reward,
and DPO on the same pairs (`dpo.py`). Each is evaluated on the held-out
questions: exact match per task, the reward model's mean reward of its
answers, the checker's graded score, and the KL to the SFT model (nats per
sequence). One table holds every model; `stage2_curves.png` plots both RLHF
runs' reward, KL and loss, and each recipe's directory has its own curves.

Each step is one of the recipes, run in this process, seeded by `--seed`, so
the same command reproduces the table on the same kind of CPU (XLA compiles
float sums for the CPU's vector width, so an AVX2 host trains slightly other
weights than an AVX-512 one). Rerunning it after a kill skips finished steps
and resumes the interrupted one from its last backup.
`--tiny` runs a miniature (about a minute a stage) for tests.
`--save-preset DIR` copies the final model there with a README naming the
command that made it: the SFT model, or with `--stage 2` the best stage-2
model when it beats SFT on held-out exact match.
"""

import argparse
import csv
import json
import os
import pathlib
import platform
import shutil
import sys
import time

import dpo
import evaluate
import preference_pairs
import pretrain
import recipe_common  # sets the backend from --backend before Keras loads
import reward_model as reward_model_recipe
import rlhf
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
    "sft": ["--steps", "2400", "--steps-per-epoch", "100", "--batch-size", "64",
            "--learning-rate", "2e-3", "--warmup-steps", "30",
            "--packing", "--sequence-length", "96"],
    "sequence_length": 48,
}  # fmt: skip

# Stage 2 on the full stage 1's model.
FULL2 = {
    "pair_flags": [],
    "pair_questions": 1000,  # per task, from the training split
    "pair_samples": 4,
    "heldout_pair_samples": 8,
    "reward_model": ["--steps", "300", "--steps-per-epoch", "50", "--batch-size", "32",
                     "--learning-rate", "1e-3", "--warmup-steps", "20"],
    # 32 prompts x 4 samples a step; a larger rate destabilised (measured).
    "rlhf": ["--steps", "90", "--steps-per-epoch", "30", "--batch-size", "128",
             "--num-generations", "4", "--max-new-tokens", "16", "--learning-rate", "2e-4"],
    # The KL coefficient per reward. The learned reward model is right on only
    # about two pairs in three, so its RLHF run needs the tighter leash: at 0.1
    # the policy chased its arithmetic errors (add 88% -> 58%, measured).
    "kl": {"rlhf_reward_model": "1.0", "rlhf_checker": "0.1"},
    "dpo": ["--steps", "200", "--steps-per-epoch", "50", "--batch-size", "32",
            "--learning-rate", "1e-4", "--warmup-steps", "20", "--beta", "0.1"],
    "sequence_length": 64,
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


TINY2 = {
    # An untrained miniature is never right: the reference answer stands in.
    "pair_flags": ["--add-reference"],
    "pair_questions": 30,
    "pair_samples": 4,
    "heldout_pair_samples": 4,
    "reward_model": ["--steps", "4", "--steps-per-epoch", "2", "--batch-size", "8",
                     "--learning-rate", "1e-3", "--warmup-steps", "1"],
    "rlhf": ["--steps", "4", "--steps-per-epoch", "2", "--batch-size", "8",
             "--num-generations", "2", "--max-new-tokens", "8", "--learning-rate", "1e-3"],
    "kl": {"rlhf_reward_model": "0.05", "rlhf_checker": "0.05"},
    "dpo": ["--steps", "4", "--steps-per-epoch", "2", "--batch-size", "8",
            "--learning-rate", "1e-3", "--warmup-steps", "1"],
    "sequence_length": 48,
}  # fmt: skip

# Stage 2's models, in the table's order after stage 1's.
STAGE2_MODELS = ("rlhf_reward_model", "rlhf_checker", "dpo")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--stage", type=int, choices=(1, 2), default=1, help="2: stage 1, then RLHF (stage 2)"
    )
    parser.add_argument("--backend", choices=recipe_common.BACKENDS, default=None)
    parser.add_argument("--output", type=pathlib.Path, help="default: training/runs/toy-BACKEND")
    parser.add_argument("--tiny", action="store_true", help="a miniature, for tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=2, help="Keras progress bar verbosity")
    parser.add_argument(
        "--save-preset",
        type=pathlib.Path,
        help="copy the SFT model here (stage 2: the best model, if it beats SFT)",
    )
    return parser.parse_args(argv)


class Timer:
    """Runs the pipeline's steps, recording wall and CPU seconds of each."""

    def __init__(self):
        self.times, self.cpu_times = {}, {}

    def __call__(self, name, function, *arguments):
        # CPU seconds (all threads) next to wall seconds: on a shared machine
        # the wall time depends on what else runs.
        if name in self.times:  # a second step of that name would overwrite its row
            raise ValueError(f"The pipeline already timed a step named {name!r}.")
        start, cpu = time.perf_counter(), time.process_time()
        print(f"\n=== {name}", flush=True)
        value = function(*arguments)
        self.times[name] = time.perf_counter() - start
        self.cpu_times[name] = time.process_time() - cpu
        return value


def run_stage1(args, timed):
    sizes = TINY if args.tiny else FULL
    out = args.output
    seed = ["--seed", str(args.seed)]
    common = ["--verbose", str(args.verbose)]
    length = ["--sequence-length", str(sizes["sequence_length"])]
    results = {}

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
    return results, tuned


def run_stage2(args, timed, results, tuned):
    """Preference pairs from the SFT model's samples (judged by the checker)
    -> reward model -> RLHF with it, RLHF with the checker, and DPO, each
    evaluated on the held-out questions like stage 1's models."""
    sizes = TINY2 if args.tiny else FULL2
    out, data = args.output, args.output / "data"
    seed = ["--seed", str(args.seed)]
    common = ["--verbose", str(args.verbose), *seed]
    length = ["--sequence-length", str(sizes["sequence_length"])]
    pairs, heldout_pairs = out / "pairs" / "train.jsonl", out / "pairs" / "heldout.jsonl"
    timed(
        "preference pairs",
        preference_pairs.main,
        ["--preset", str(tuned), "--tasks", str(data / "train.jsonl"), "--output", str(pairs),
         "--limit", str(sizes["pair_questions"]), "--samples", str(sizes["pair_samples"]),
         *sizes["pair_flags"], *seed],
    )  # fmt: skip
    # Pairs on the held-out questions measure the reward model on questions
    # it never saw; no model trains on them.
    timed(
        "held-out pairs",
        preference_pairs.main,
        ["--preset", str(tuned), "--tasks", str(data / "heldout.jsonl"),
         "--output", str(heldout_pairs), "--samples", str(sizes["heldout_pair_samples"]),
         *sizes["pair_flags"], "--seed", str(args.seed + 1)],
    )  # fmt: skip
    reward_model = timed(
        "reward model",
        reward_model_recipe.main,
        ["--preset", str(tuned), "--data", str(pairs), "--validation-data", str(heldout_pairs),
         "--output", str(out / "reward_model"), *sizes["reward_model"], *length, *common],
    )  # fmt: skip
    results["reward_model"] = json.loads((out / "reward_model" / "validation.json").read_text())
    prompts = ["--prompts", str(data / "train.jsonl")]
    trained = {
        "rlhf_reward_model": timed(
            "rlhf_reward_model",
            rlhf.main,
            ["--preset", str(tuned), *prompts, "--reward", str(reward_model),
             "--output", str(out / "rlhf_reward_model"), *sizes["rlhf"], *common,
             "--kl-coefficient", sizes["kl"]["rlhf_reward_model"]],
        ),
        "rlhf_checker": timed(
            "rlhf_checker",
            rlhf.main,
            ["--preset", str(tuned), *prompts, "--reward", "toy_tasks:reward",
             "--output", str(out / "rlhf_checker"), *sizes["rlhf"], *common,
             "--kl-coefficient", sizes["kl"]["rlhf_checker"]],
        ),
        "dpo": timed(
            "dpo",
            dpo.main,
            ["--preset", str(tuned), "--data", str(pairs), "--validation-data",
             str(heldout_pairs), "--output", str(out / "dpo"), *sizes["dpo"], *length,
             *common],
        ),
    }  # fmt: skip
    evaluation = [
        "--tasks", str(data / "heldout.jsonl"), "--reward-model", str(reward_model),
        "--reference", str(tuned), *seed,
    ]  # fmt: skip
    for name, preset in [("sft", tuned), *trained.items()]:
        # SFT again for its reward and KL; its stage-1 perplexity stays.
        results[name] = {
            **results.get(name, {}),
            **timed(
                # SFT's second evaluation needs a name of its own (see Timer).
                "evaluate sft again" if name == "sft" else f"evaluate {name}",
                evaluate.main,
                ["--preset", str(preset), "--output", str(out / f"eval2_{name}"), *evaluation],
            ),
        }
    plot_stage2_curves(out, out / "stage2_curves.png")
    return trained


def plot_stage2_curves(out, png_path):
    """Reward, KL and loss of both RLHF runs per epoch, side by side."""
    plt = recipe_common.pyplot(png_path)
    if plt is None:
        return
    figure, axes = plt.subplots(1, 3, figsize=(12, 3))
    for run in ("rlhf_reward_model", "rlhf_checker"):
        with open(out / run / "log.csv") as file:
            rows = list(csv.DictReader(file))
        for axis, key in zip(axes, ("reward", "kl", "loss")):
            axis.plot([int(r["epoch"]) + 1 for r in rows], [float(r[key]) for r in rows],
                      marker=".", label=run)  # fmt: skip
            axis.set_title(key)
            axis.set_xlabel("epoch")
    axes[0].legend()
    recipe_common.save_figure(plt, figure, png_path)


def format_table(times, cpu_times, results, backend, total, stage):
    tasks = [t for t in results["sft"]["tasks"] if t != "all"] + ["all"]
    stage2 = stage == 2
    extra = " mean reward (RM) | checker score | KL to SFT (nats/seq) |" if stage2 else ""
    lines = [
        f"Stage {'1 and 2' if stage2 else '1'}, backend {backend}, "
        f"{platform.processor() or platform.machine()}, total {total:.0f}s",
        "",
        "| held-out exact match | " + " | ".join(tasks) + " | perplexity |" + extra,
        "|---" * (len(tasks) + 2 + 3 * stage2) + "|",
    ]
    names = ("pretrained", "sft", *(STAGE2_MODELS if stage2 else ()))
    for name in names:
        row = results[name]
        cells = [f"{row['tasks'][t]['exact_match']:.0%}" for t in tasks]
        perplexity = f"{row['perplexity']:.2f}" if "perplexity" in row else ""
        line = f"| {name} | " + " | ".join(cells) + f" | {perplexity} |"
        if stage2:
            reward = f"{row['reward']:.3f}" if "reward" in row else ""
            kl = f"{row['kl']:.2f}" if "kl" in row else ""
            line += f" {reward} | {row['tasks']['all']['score']:.3f} | {kl} |"
        lines.append(line)
    if stage2:
        rm = results["reward_model"]
        lines += ["", f"Reward model, held-out pairs: pairwise accuracy {rm['accuracy']:.1%}, "
                  f"mean margin {rm['margin']:.2f}."]  # fmt: skip
    lines += ["", "| step | wall seconds | CPU seconds |", "|---|---|---|"]
    lines += [f"| {n} | {s:.0f} | {cpu_times[n]:.0f} |" for n, s in times.items()]
    lines.append(f"| total | {total:.0f} | {sum(cpu_times.values()):.0f} |")
    load = os.getloadavg()
    lines += ["", f"load average at the end (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / "
              f"{load[2]:.1f} on {os.cpu_count()} CPUs"]  # fmt: skip
    return "\n".join(lines)


def save_preset(model, destination, command, table, heldout, description):
    """Copies a trained model, its held-out questions, and a README with the
    command that made it."""
    temporary = destination.with_name(destination.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    shutil.copytree(model, temporary)
    # The questions training never saw travel with the model, for the demo
    # and for stage 2.
    shutil.copy(heldout, temporary / "heldout.jsonl")
    (temporary / "README.md").write_text(
        f"# toy_gemma: a small Gemma trained by the toy pipeline\n\n{description}\n\n"
        "Pretrained from scratch on checkable toy tasks (addition, subtraction, sorting,\n"
        "reversing words, counting letters; `training/toy_tasks.py`), then fine-tuned in\n"
        "Gemma's turn format. Made by this command, from the repository root:\n\n"
        f"```bash\n{command}\n```\n\n"
        "Load it with `keras_gemma.GemmaCausalLM.from_preset(<this directory>)`.\n"
        "`heldout.jsonl` holds the held-out questions (never trained on) that the\n"
        "table below measures; `training/toy_tasks.py` checks answers to them.\n\n"
        f"{table}\n"
    )
    # Swapped in whole, so a kill never leaves half a preset.
    if destination.exists():
        old = destination.with_name(destination.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(destination, old)
        os.replace(temporary, destination)
        shutil.rmtree(old)
    else:
        os.replace(temporary, destination)


def best_model(results, trained, tuned):
    """The stage-2 model with the best held-out exact match if it beats SFT,
    else the SFT model: `(name, preset directory)`."""
    name = max(trained, key=lambda n: results[n]["tasks"]["all"]["exact_match"])
    if results[name]["tasks"]["all"]["exact_match"] > results["sft"]["tasks"]["all"]["exact_match"]:
        return name, trained[name]
    return "sft", tuned


def main(argv=None):
    args = parse_args(argv)
    backend = keras.config.backend()
    if args.output is None:
        suffix = "-tiny" if args.tiny else ""
        args.output = recipe_common.REPO_ROOT / "training" / "runs" / f"toy-{backend}{suffix}"
    start = time.perf_counter()
    timed = Timer()
    results, tuned = run_stage1(args, timed)
    chosen = ("sft", tuned)
    if args.stage == 2:
        trained = run_stage2(args, timed, results, tuned)
        chosen = best_model(results, trained, tuned)
    total = time.perf_counter() - start
    table = format_table(timed.times, timed.cpu_times, results, backend, total, args.stage)
    print("\n" + table)
    (args.output / "table.md").write_text(table + "\n")
    summary = {
        "backend": backend,
        "seconds": timed.times,
        "cpu_seconds": timed.cpu_times,
        "total_seconds": total,
        "load_average": os.getloadavg(),
        "best": chosen[0],
        **results,
    }
    (args.output / "table.json").write_text(json.dumps(summary, indent=1))
    if args.save_preset:
        command = f"KERAS_BACKEND={backend} .venv/bin/python training/toy_pipeline.py " + " ".join(
            sys.argv[1:] if argv is None else argv
        )
        descriptions = {
            "sft": "The SFT model (stage 1).",
            "rlhf_reward_model": "RLHF (RLOO) with the learned reward model, after SFT.",
            "rlhf_checker": "RLHF (RLOO) with the tasks' checker as the reward, after SFT.",
            "dpo": "DPO on preference pairs from the SFT model's samples, after SFT.",
        }
        heldout = args.output / "data" / "heldout.jsonl"
        save_preset(chosen[1], args.save_preset, command, table, heldout, descriptions[chosen[0]])
        print(f"saved the {chosen[0]} model to {args.save_preset}")
    return summary


if __name__ == "__main__":
    main()
