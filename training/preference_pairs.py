"""Preference pairs from a model's own samples, judged by the toy tasks' checker.

Usage:

    python training/preference_pairs.py --preset runs/sft/preset \
        --tasks train.jsonl --output pairs.jsonl \
        [--samples 4] [--temperature 1.0] [--limit 300] [--seed 0] [--backend jax]

For each question of `--tasks` (JSONL of `{"task", "question", "answer"}`, as
`toy_tasks.py` writes; `--limit` questions per task), samples `--samples`
answers from the model in Gemma's turn format at `--temperature`, grades
each with `toy_tasks.score`, and writes a pair when the grades differ:
chosen is the best answer (right, or the closest), rejected the worst
(wrong). Questions whose samples all got the same grade give no pair (they
teach a reward model nothing). Writes the pairs as JSONL rows `{"prompt",
"chosen", "rejected", "task"}`, the format `reward_model.py` and `dpo.py`
read, and prints how many questions gave a pair per task.
"""

import argparse
import os
import pathlib

import evaluate
import recipe_common  # sets the backend from --backend before Keras loads
import toy_tasks

import keras_gemma


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", required=True, help="preset name, handle or directory")
    parser.add_argument("--tasks", type=pathlib.Path, required=True, help="JSONL questions")
    parser.add_argument("--output", type=pathlib.Path, required=True, help="the pairs, JSONL")
    parser.add_argument("--samples", type=int, default=4, help="answers sampled per question")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--limit", type=int, default=0, help="questions per task (0: all)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--add-reference",
        action="store_true",
        help="when no sample is right, pair the reference answer against the worst one "
        "(for models too weak to be right on their own, e.g. the pipeline's miniature)",
    )
    parser.add_argument("--backend", choices=recipe_common.BACKENDS, default=None)
    return parser.parse_args(argv)


def first_per_task(examples, limit):
    """The first `limit` examples of each task (all with `limit=0`)."""
    if not limit:
        return list(examples)
    seen, kept = {}, []
    for example in examples:
        seen[example["task"]] = seen.get(example["task"], 0) + 1
        if seen[example["task"]] <= limit:
            kept.append(example)
    return kept


def sample_answers(lm, questions, samples, temperature, seed, batch_size=256, max_new_tokens=24):
    """`samples` answers per question, sampled at `temperature`: a list of lists."""
    lm.compile(sampler=keras_gemma.RandomSampler(temperature=temperature, seed=seed))
    repeated = [q for q in questions for _ in range(samples)]
    answers = evaluate.answer_questions(lm, repeated, "turns", batch_size, max_new_tokens)
    lm.compile(sampler="greedy")
    return [answers[i : i + samples] for i in range(0, len(answers), samples)]


def make_pairs(examples, answers, add_reference=False):
    """Pairs `{"prompt", "chosen", "rejected", "task"}` where a question's
    graded answers differ: the best against the worst. With `add_reference`,
    the reference answer joins the candidates when no sample is right."""
    pairs = []
    for example, candidates in zip(examples, answers):
        task, question = example["task"], example["question"]
        graded = sorted({(toy_tasks.score(task, question, a), a) for a in candidates})
        if add_reference and graded[-1][0] < 1.0:
            graded.append((1.0, example["answer"]))
        (low, rejected), (high, chosen) = graded[0], graded[-1]
        if high > low:
            pairs.append({"prompt": question, "chosen": chosen, "rejected": rejected, "task": task})
    return pairs


def main(argv=None):
    args = parse_args(argv)
    examples = first_per_task(toy_tasks.read_jsonl(args.tasks), args.limit)
    lm = keras_gemma.GemmaCausalLM.from_preset(args.preset)
    answers = sample_answers(
        lm,
        [e["question"] for e in examples],
        args.samples,
        args.temperature,
        args.seed,
        args.batch_size,
        args.max_new_tokens,
    )
    pairs = make_pairs(examples, answers, args.add_reference)
    if not pairs:
        raise SystemExit(
            "No question gave a pair (every sample got the same grade): sample more answers "
            "or at a higher --temperature."
        )
    counts = {}
    for example in examples:
        counts.setdefault(example["task"], [0, 0])[1] += 1
    for pair in pairs:
        counts[pair["task"]][0] += 1
    print(" ".join(f"{t}={made}/{n}" for t, (made, n) in counts.items()), "questions gave a pair")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.output.with_name(args.output.name + ".tmp")
    toy_tasks.write_jsonl(temporary, pairs)
    os.replace(temporary, args.output)
    print(f"wrote {len(pairs)} pairs to {args.output}")
    return {"pairs": len(pairs), "per_task": {t: made for t, (made, _) in counts.items()}}


if __name__ == "__main__":
    main()
