"""Evaluates a Gemma: exact match per task by the checker, and perplexity.

Usage:

    python training/evaluate.py --preset runs/sft/preset --output runs/eval \
        [--tasks heldout.jsonl] [--text heldout.txt] [--backend jax]
        [--format turns|plain] [--limit N] [--batch-size 64]

`--tasks` is JSONL of `{"task", "question", "answer"}` (as `toy_tasks.py`
writes): each question is answered by greedy generation, prompted in Gemma's
turn format (`--format turns`, default) or as plain text
(`--format plain`, the pretraining format: the question, then its answer), and judged by
`toy_tasks.check`; `toy_tasks.score` gives the graded reward. `--text` is a
text file, one document a line, whose perplexity (per predicted token) is
reported. Writes `results.json`, `predictions.jsonl`, `log.csv` (one row per
task) and `curves.png` (exact match per task) into `--output`. Evaluation is
deterministic, so rerunning after a kill gives the same numbers.
"""

import argparse
import csv
import json
import math
import pathlib
import time

import recipe_common  # sets the backend from --backend before Keras loads
import toy_tasks
from recipe_common import keras
from recipe_common import np

import keras_gemma


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", required=True, help="preset name, handle or directory")
    parser.add_argument("--output", type=pathlib.Path, required=True, help="run directory")
    parser.add_argument("--tasks", type=pathlib.Path, help="JSONL of task/question/answer")
    parser.add_argument("--text", type=pathlib.Path, help="text for perplexity, a document a line")
    parser.add_argument("--format", choices=("turns", "plain"), default="turns")
    parser.add_argument("--limit", type=int, default=0, help="questions per task (0: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--backend", choices=recipe_common.BACKENDS, default=None)
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the preset's)")
    parser.add_argument("--model-parallel", type=int, default=1, help="JAX: split weights")
    return parser.parse_args(argv)


def prompt_for(question, prompt_format):
    if prompt_format == "turns":
        return keras_gemma.format_turns([("user", question)])
    # No trailing space: the pretraining text's pieces carry their leading
    # space ("▁pen"), so the model writes it as part of the answer.
    return question


def answer_questions(lm, questions, prompt_format="turns", batch_size=64, max_new_tokens=24):
    """Greedy answers to `questions`, in batches."""
    tokenizer = lm.preprocessor.tokenizer
    answers = []
    for start in range(0, len(questions), batch_size):
        prompts = [prompt_for(q, prompt_format) for q in questions[start : start + batch_size]]
        longest = max(len(ids) for ids in tokenizer.tokenize(prompts)) + 1  # + <bos>
        # Plain prompts have no end-of-turn to stop at, so they stop at <eos>
        # or a line break, as the pretraining text ends a document.
        outputs = lm.generate(prompts, max_length=longest + max_new_tokens, strip_prompt=True)
        answers.extend(o.split("\n")[0].strip() for o in outputs)
    return answers


def exact_match(lm, examples, prompt_format="turns", batch_size=64, max_new_tokens=24):
    """Per-task `{"exact_match", "score", "count"}` and the predictions."""
    answers = answer_questions(
        lm, [e["question"] for e in examples], prompt_format, batch_size, max_new_tokens
    )
    predictions, per_task = [], {}
    for example, answer in zip(examples, answers):
        correct = toy_tasks.check(example["task"], example["question"], answer)
        reward = toy_tasks.score(example["task"], example["question"], answer)
        predictions.append({**example, "prediction": answer, "correct": correct, "score": reward})
        stats = per_task.setdefault(example["task"], [0, 0.0, 0])
        stats[0] += correct
        stats[1] += reward
        stats[2] += 1
    results = {
        task: {"exact_match": c / n, "score": s / n, "count": n}
        for task, (c, s, n) in per_task.items()
    }
    total = len(predictions)
    results["all"] = {
        "exact_match": sum(p["correct"] for p in predictions) / total,
        "score": sum(p["score"] for p in predictions) / total,
        "count": total,
    }
    return results, predictions


def perplexity(lm, texts, batch_size=64):
    """exp(mean negative log-likelihood per predicted token), `<eos>` included."""
    total, count = 0.0, 0.0
    for start in range(0, len(texts), batch_size):
        x, y, weights = lm.preprocessor(texts[start : start + batch_size])
        log_probs = lm.score(
            x["token_ids"], x["padding_mask"], scoring_mode="log_probs", target_ids=y
        )
        log_probs = np.asarray(keras.ops.convert_to_numpy(log_probs))
        total += float((log_probs * weights).sum())
        count += float(weights.sum())
    return math.exp(-total / count)


def main(argv=None):
    args = parse_args(argv)
    recipe_common.setup_distribution(args.model_parallel)
    kwargs = {"dtype": args.dtype} if args.dtype else {}
    lm = keras_gemma.GemmaCausalLM.from_preset(args.preset, **kwargs)
    args.output.mkdir(parents=True, exist_ok=True)
    results = {"backend": keras.config.backend(), "preset": str(args.preset)}
    start = time.perf_counter()
    if args.tasks:
        examples = toy_tasks.read_jsonl(args.tasks)
        if args.limit:
            seen = {}
            for example in examples:
                seen[example["task"]] = seen.get(example["task"], 0) + 1
                example["keep"] = seen[example["task"]] <= args.limit
            examples = [e for e in examples if e.pop("keep")]
        per_task, predictions = exact_match(
            lm, examples, args.format, args.batch_size, args.max_new_tokens
        )
        results["tasks"] = per_task
        toy_tasks.write_jsonl(args.output / "predictions.jsonl", predictions)
        with open(args.output / "log.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["task", "exact_match", "score", "count"])
            for task, stats in per_task.items():
                writer.writerow([task, stats["exact_match"], stats["score"], stats["count"]])
        plot_exact_match(per_task, args.output / "curves.png")
        for task, stats in per_task.items():
            print(
                f"{task:8} exact match {stats['exact_match']:6.1%}  "
                f"score {stats['score']:.3f}  ({stats['count']} questions)"
            )
    if args.text:
        texts = [line for line in args.text.read_text(encoding="utf-8").splitlines() if line]
        results["perplexity"] = perplexity(lm, texts, args.batch_size)
        print(f"perplexity {results['perplexity']:.3f} on {len(texts)} documents")
    results["seconds"] = round(time.perf_counter() - start, 1)
    (args.output / "results.json").write_text(json.dumps(results, indent=1))
    return results


def plot_exact_match(per_task, png_path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed; no {png_path}.")
        return
    figure, axis = plt.subplots(figsize=(5, 3))
    names = list(per_task)
    axis.bar(names, [per_task[n]["exact_match"] for n in names])
    axis.set_ylim(0, 1)
    axis.set_ylabel("exact match")
    figure.tight_layout()
    figure.savefig(png_path, dpi=80)
    plt.close(figure)


if __name__ == "__main__":
    main()
