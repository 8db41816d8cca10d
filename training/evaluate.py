"""Evaluates a Gemma: exact match per task by the checker, perplexity, and
optionally a reward model's mean reward and the KL to a reference model.

Usage:

    python training/evaluate.py --preset runs/sft/preset --output runs/eval \
        [--tasks heldout.jsonl] [--text heldout.txt] [--backend jax]
        [--format turns|plain] [--limit N] [--batch-size 64]
        [--reward-model runs/rm/preset] [--reference runs/sft/preset]

`--tasks` is JSONL of `{"task", "question", "answer"}` (as `toy_tasks.py`
writes): each question is answered by greedy generation, prompted in Gemma's
turn format (`--format turns`, default) or as plain text
(`--format plain`, the pretraining format: the question, then its answer), and judged by
`toy_tasks.check`; `toy_tasks.score` gives the graded reward. `--text` is a
text file, one document a line, whose perplexity (per predicted token) is
reported. `--reward-model` adds the mean reward of the greedy answers;
`--reference` the KL to that model (nats per sequence, on two completions
per question sampled at temperature 1). Writes `results.json`,
`predictions.jsonl`, `log.csv` (one row per task) and `curves.png` (exact
match per task) into `--output`. Evaluation is deterministic, so rerunning
after a kill gives the same numbers.
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
    parser.add_argument(
        "--reward-model", help="a reward model preset: also report its mean reward of the answers"
    )
    parser.add_argument(
        "--reference",
        help="a preset (e.g. the SFT model): also report the KL to it, nats per sequence",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the KL's samples")
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


def mean_reward(reward_model, questions, answers, batch_size=64):
    """A reward model's mean reward of `answers`, in the turn layout it was trained on."""
    rewards = reward_model.predict(
        {
            "prompts": [prompt_for(q, "turns") for q in questions],
            "responses": [a + "<end_of_turn>" for a in answers],
        },
        batch_size=batch_size,
        verbose=0,
    )
    return float(np.mean(keras.ops.convert_to_numpy(rewards)))


def kl_to_reference(lm, reference, questions, samples=2, max_new_tokens=24, seed=0, batch_size=64):
    """KL(lm || reference) in nats per sequence, estimated on completions
    sampled from `lm` at temperature 1: the mean of `Σ log π − log π_ref`
    over each completion's tokens (its end token included)."""
    from keras_gemma.alignment import GemmaPolicyOptimizer

    sampler = GemmaPolicyOptimizer(
        lm,
        lambda prompts, completions: np.zeros(len(completions)),
        num_generations=samples,
        max_new_tokens=max_new_tokens,
        kl_coefficient=0.0,
        reference=reference,
        seed=seed,
    )
    totals = []
    for start in range(0, len(questions), batch_size):
        prompts = [prompt_for(q, "turns") for q in questions[start : start + batch_size]]
        batch = sampler.rollout(prompts)
        totals.append(batch["old_log_probs"].sum(axis=1) - batch["reference_log_probs"].sum(axis=1))
    return float(np.concatenate(totals).mean())


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
        questions = [p["question"] for p in predictions]
        if args.reward_model:
            from keras_gemma.alignment import GemmaRewardModel

            scorer = GemmaRewardModel.from_preset(args.reward_model, **kwargs)
            answers = [p["prediction"] for p in predictions]
            results["reward"] = mean_reward(scorer, questions, answers, args.batch_size)
            print(f"mean reward {results['reward']:.3f} ({args.reward_model})")
        if args.reference:
            reference = keras_gemma.GemmaCausalLM.from_preset(args.reference, **kwargs)
            results["kl"] = kl_to_reference(
                lm, reference, questions, 2, args.max_new_tokens, args.seed, args.batch_size
            )
            print(f"KL to {args.reference}: {results['kl']:.3f} nats per sequence")
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
    plt = recipe_common.pyplot(png_path)
    if plt is None:
        return
    figure, axis = plt.subplots(figsize=(5, 3))
    names = list(per_task)
    axis.bar(names, [per_task[n]["exact_match"] for n in names])
    axis.set_ylim(0, 1)
    axis.set_ylabel("exact match")
    recipe_common.save_figure(plt, figure, png_path)


if __name__ == "__main__":
    main()
