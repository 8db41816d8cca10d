"""Toy tasks whose answers a program checks: the data of the toy pipeline.

Five task families, phrased as questions, generated from a fixed seed:

    add      What is 47 + 85?                                    -> 132
    sub      What is 72 - 58?                                    -> 14
    sort     Sort from smallest to largest: 42 7 19              -> 7 19 42
    reverse  Reverse the order of the words: cat sun tree        -> tree sun cat
    count    How many times does the letter r appear in "strawberry"? -> 3

and one more, `max` (Which number is the largest: 42 7 19 -> 42), kept out of
the pipeline's data so the demo can teach it as something new.

`check(task, question, answer)` says whether an answer is right and
`score(task, question, answer)` grades it in [0, 1] (1.0 when right, partial
credit for being close), so the RLHF stage can use it as a reward. Both
recompute the answer from the question, so they need no stored labels.

Usage (writes train.jsonl, heldout.jsonl, pretrain.txt, heldout.txt and
tokenizer.txt, the vocabulary's corpus):

    python training/toy_tasks.py --output training/data/toy [--train 4000]
        [--heldout 50] [--seed 0] [--tasks add,sub,sort,reverse,count]
        [--train-scale add=2,sub=2]
"""

import argparse
import json
import pathlib
import random
import re

TASKS = ("add", "sub", "sort", "reverse", "count")
# Not in the pipeline's data: something new for the demo to teach with LoRA.
NEW_TASKS = ("max",)

# Short, common words whose letters give the counting task a spread of answers.
WORDS = (
    "apple banana cherry grape lemon mango melon peach pear plum berry "
    "cat dog bird fish horse sheep goat mouse tiger zebra "
    "red blue green black white yellow brown pink "
    "sun moon star rain snow wind cloud storm "
    "tree leaf river lake hill stone sand road "
    "book pen paper table chair door window house "
    "happy sleepy little letter coffee bottle summer winter"
).split()


def _number(rng, max_digits):
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def make_example(task, rng):
    """One `{"task", "question", "answer"}` example of `task`, drawn from `rng`."""
    # Sizes are set so that a small model learns each task within minutes on
    # a CPU, yet not perfectly: stage 2 (RLHF) needs room to improve.
    if task == "add":
        a, b = _number(rng, 2), _number(rng, 2)
        question = f"What is {a} + {b}?"
    elif task == "sub":
        a, b = sorted((_number(rng, 2), _number(rng, 2)), reverse=True)
        question = f"What is {a} - {b}?"
    elif task == "sort":
        numbers = [rng.randint(0, 99) for _ in range(3)]
        question = "Sort from smallest to largest: " + " ".join(map(str, numbers))
    elif task == "reverse":
        words = rng.sample(WORDS, rng.randint(2, 3))
        question = "Reverse the order of the words: " + " ".join(words)
    elif task == "count":
        word = rng.choice(WORDS)
        # Mostly letters of the word (answers 1-3), sometimes absent ones (0).
        alphabet = "abcdefghijklmnopqrstuvwxyz"
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(alphabet)
        question = f'How many times does the letter {letter} appear in "{word}"?'
    elif task == "max":
        numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
        question = "Which number is the largest: " + " ".join(map(str, numbers))
    else:
        raise ValueError(f"Unknown task {task!r}; expected one of {TASKS + NEW_TASKS}.")
    return {"task": task, "question": question, "answer": solve(task, question)}


def solve(task, question):
    """The right answer to `question`, recomputed from its text."""
    if task in ("add", "sub"):
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", question).groups()
        return str(int(a) + int(b) if op == "+" else int(a) - int(b))
    if task == "sort":
        numbers = question.split(":", 1)[1].split()
        return " ".join(str(n) for n in sorted(int(n) for n in numbers))
    if task == "max":
        return str(max(int(n) for n in question.split(":", 1)[1].split()))
    if task == "reverse":
        return " ".join(reversed(question.split(":", 1)[1].split()))
    if task == "count":
        letter, word = re.fullmatch(
            r'How many times does the letter (\w) appear in "(\w+)"\?', question
        ).groups()
        return str(word.count(letter))
    raise ValueError(f"Unknown task {task!r}; expected one of {TASKS + NEW_TASKS}.")


def _normalize(answer):
    # Generated answers may carry surrounding spaces or a final period.
    return " ".join(answer.strip().rstrip(".").split())


def check(task, question, answer):
    """True when `answer` is exactly right (surrounding spaces ignored)."""
    return _normalize(answer) == solve(task, question)


def score(task, question, answer):
    """A reward in [0, 1]: 1.0 when right, up to 0.5 for a close miss, else 0.

    Numbers earn partial credit by relative distance; lists by the fraction
    of positions that match, so a reward model sees a graded signal.
    """
    if check(task, question, answer):
        return 1.0
    target = solve(task, question)
    given = _normalize(answer)
    if task in ("add", "sub", "count", "max"):
        try:
            value = int(given)
        except ValueError:
            return 0.0
        closeness = 1.0 - abs(value - int(target)) / max(abs(int(target)), 1)
        return 0.5 * max(0.0, closeness)
    expected, words = target.split(), given.split()
    matches = sum(a == b for a, b in zip(expected, words))
    return 0.5 * matches / max(len(expected), len(words))


# How each task's questions begin: enough to tell a question's task.
_QUESTION_PATTERNS = {
    "sort": r"Sort from smallest to largest: ",
    "reverse": r"Reverse the order of the words: ",
    "count": r"How many times does the letter ",
    "max": r"Which number is the largest: ",
    "add": r"What is \d+ \+ ",
    "sub": r"What is \d+ - ",
}


def task_of(question):
    """The task a question belongs to, from its wording."""
    for task, pattern in _QUESTION_PATTERNS.items():
        if re.match(pattern, question):
            return task
    raise ValueError(f"Not a toy-task question: {question!r}")


def question_of(prompt):
    """The question inside a prompt in Gemma's turn format (or the prompt itself)."""
    match = re.search(r"<start_of_turn>user\n(.*?)<end_of_turn>", prompt, re.S)
    return (match.group(1) if match else prompt).strip()


def reward(prompts, completions):
    r"""`score` as an RLHF reward: `reward(prompts, completions) -> floats`.

    Example:
    >>> reward(["<start_of_turn>user\nWhat is 2 + 3?<end_of_turn>\n<start_of_turn>model\n"],
    ...        ["5"])
    [1.0]
    """
    values = []
    for prompt, completion in zip(prompts, completions):
        question = question_of(prompt)
        values.append(score(task_of(question), question, completion.split("\n")[0]))
    return values


def make_splits(num_train, num_heldout, seed=0, tasks=TASKS, train_scale=None):
    """Train and held-out examples, `num_*` per task, disjoint by question.

    `train_scale` multiplies some tasks' training share, e.g. `{"add": 2}`.

    Held-out questions are drawn first and every training question equal to
    one of them is skipped, so evaluation never sees a training question.
    Training questions are kept distinct too, as far as the task allows.
    """
    rng = random.Random(seed)
    heldout, train = [], []
    for task in tasks:
        heldout_questions = set()
        while len(heldout_questions) < num_heldout:
            example = make_example(task, rng)
            if example["question"] not in heldout_questions:
                heldout_questions.add(example["question"])
                heldout.append(example)
        seen, count, attempts = set(heldout_questions), 0, 0
        task_train = int(num_train * (train_scale or {}).get(task, 1))
        while count < task_train:
            example = make_example(task, rng)
            attempts += 1
            question = example["question"]
            # Small tasks (counting) run out of new questions: after many
            # tries, training questions may repeat, held-out ones never.
            if question in heldout_questions or (question in seen and attempts < 20 * num_train):
                continue
            seen.add(question)
            train.append(example)
            count += 1
    # A fixed interleaving, so every batch mixes the tasks.
    random.Random(seed + 1).shuffle(train)
    return train, heldout


def pretraining_text(example):
    """An example as plain text, with no turn markers: the pretraining corpus."""
    return f"{example['question']} {example['answer']}"


def chat_text(example):
    """An example in Gemma's turn format, as SFT trains on it."""
    return (
        f"<start_of_turn>user\n{example['question']}<end_of_turn>\n"
        f"<start_of_turn>model\n{example['answer']}<end_of_turn>"
    )


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")


def read_jsonl(path):
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def write_splits(output, num_train, num_heldout, seed=0, tasks=TASKS, train_scale=None):
    """Writes the data files into `output`; returns their paths."""
    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    train, heldout = make_splits(num_train, num_heldout, seed, tasks, train_scale)
    paths = {
        "train": output / "train.jsonl",
        "heldout": output / "heldout.jsonl",
        "pretrain": output / "pretrain.txt",
        "heldout_text": output / "heldout.txt",
        "tokenizer": output / "tokenizer.txt",
    }
    write_jsonl(paths["train"], train)
    write_jsonl(paths["heldout"], heldout)
    paths["pretrain"].write_text("".join(pretraining_text(e) + "\n" for e in train))
    paths["heldout_text"].write_text("".join(pretraining_text(e) + "\n" for e in heldout))
    # The vocabulary also sees training examples in the turn format, so that
    # "user" and "model" become single pieces.
    paths["tokenizer"].write_text(
        "".join(pretraining_text(e) + "\n" for e in train)
        + "".join(chat_text(e) + "\n" for e in train[: len(train) // 4])
    )
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=pathlib.Path, default=pathlib.Path("training/data/toy"))
    parser.add_argument("--train", type=int, default=4000, help="training examples per task")
    parser.add_argument("--heldout", type=int, default=50, help="held-out examples per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    parser.add_argument(
        "--train-scale", default="", help="more training data for some tasks, e.g. add=2,sub=2"
    )
    args = parser.parse_args(argv)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    scale = {k: float(v) for k, v in (p.split("=") for p in args.train_scale.split(",") if p)}
    paths = write_splits(args.output, args.train, args.heldout, args.seed, tasks, scale)
    for name, path in paths.items():
        print(f"{name:13} {path}")
    return paths


if __name__ == "__main__":
    main()
