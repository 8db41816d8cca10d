"""Mutation score of the fast test subset: how many small code changes it catches.

Not part of CI. Each mutant changes one operator or constant in the model
math (`keras_gemma/layers/`, `samplers.py`, `preprocessor.py`, `chat.py`,
`lora.py`): `+`/`-`, `*`/`/`, a comparison flipped or loosened, a number moved
by one, `True`/`False`, a unary minus dropped. A random sample of them (fixed
seed) is run against the tests, one mutant at a time, on a copy of the package
placed first on `PYTHONPATH`; a mutant is killed when the tests fail (or run
past the time limit twice; those are listed apart). Survivors are listed so
they can be read: some are equivalent (a change no behaviour can show), the
rest are gaps in the tests.

    # the score with the tests as they are
    KERAS_BACKEND=torch python benchmarks/mutation_score.py --sample 40
    # the same mutants against the tests of an older commit
    KERAS_BACKEND=torch python benchmarks/mutation_score.py --sample 40 --tests-from <commit>
    # mutants of a committed package, so edits elsewhere in the working tree
    # (which change the mutation points, hence the sample) do not move them
    KERAS_BACKEND=torch python benchmarks/mutation_score.py --sample 40 --package-from <commit>

The sample is a fixed-seed shuffle of every mutation point, so it is the same
only while the mutated files are: compare runs on one `--package-from`.
"""

import argparse
import ast
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = [
    "keras_gemma/layers/attention.py",
    "keras_gemma/layers/decoder_block.py",
    "keras_gemma/layers/feed_forward.py",
    "keras_gemma/layers/projection.py",
    "keras_gemma/layers/rms_normalization.py",
    "keras_gemma/layers/rotary_embedding.py",
    "keras_gemma/samplers.py",
    "keras_gemma/preprocessor.py",
    "keras_gemma/chat.py",
    "keras_gemma/lora.py",
]
# The fast subset: the tests of the mutated modules that run in seconds on
# torch (test_generate.py and test_lora.py take minutes; add them with --tests;
# test_lora_math.py is LoRA's arithmetic on a one-block model).
TESTS = [
    "tests/test_layers.py",
    "tests/test_samplers.py",
    "tests/test_preprocessor.py",
    "tests/test_stream_chat.py",
    "tests/test_lora_math.py",
]

_SWAPS = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Mult,
    ast.Mod: ast.FloorDiv,
    ast.Pow: ast.Mult,
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.And: ast.Or,
    ast.Or: ast.And,
}


def _docstring_nodes(tree):
    skip = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                skip.add(id(body[0].value))
    return skip


def mutation_points(source):
    """`(index, line, description)` of every mutation `mutate` can apply."""
    tree = ast.parse(source)
    skip = _docstring_nodes(tree)
    points = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in _SWAPS:
            points.append((line, f"{type(node.op).__name__} -> {_SWAPS[type(node.op)].__name__}"))
        elif isinstance(node, ast.Compare):
            for op in node.ops:
                if type(op) in _SWAPS:
                    points.append((line, f"{type(op).__name__} -> {_SWAPS[type(op)].__name__}"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            points.append((line, "drop unary -"))
        elif isinstance(node, ast.Constant) and id(node) not in skip:
            if isinstance(node.value, bool):
                points.append((line, f"{node.value} -> {not node.value}"))
            elif isinstance(node.value, (int, float)):
                points.append((line, f"{node.value!r} -> {node.value + 1!r}"))
    return points


def mutate(source, index):
    """`source` with mutation point `index` (in `mutation_points` order) applied."""
    tree = ast.parse(source)
    skip = _docstring_nodes(tree)
    counter = 0
    for node in ast.walk(tree):
        if isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in _SWAPS:
            if counter == index:
                node.op = _SWAPS[type(node.op)]()
                return ast.unparse(tree)
            counter += 1
        elif isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in _SWAPS:
                    if counter == index:
                        node.ops[i] = _SWAPS[type(op)]()
                        return ast.unparse(tree)
                    counter += 1
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            if counter == index:
                node.op = ast.UAdd()
                return ast.unparse(tree)
            counter += 1
        elif isinstance(node, ast.Constant) and id(node) not in skip:
            if isinstance(node.value, bool):
                if counter == index:
                    node.value = not node.value
                    return ast.unparse(tree)
                counter += 1
            elif isinstance(node.value, (int, float)):
                if counter == index:
                    node.value = node.value + 1
                    return ast.unparse(tree)
                counter += 1
    raise IndexError(index)


def run_tests(package_parent, tests_dir, tests, timeout):
    """pytest's return code (124 on timeout) with `package_parent` first on the path."""
    env = dict(os.environ, PYTHONPATH=package_parent, TF_CPP_MIN_LOG_LEVEL="3")
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-q",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        tests_dir,
        "-c",
        os.path.join(ROOT, "pyproject.toml"),
    ] + [os.path.join(tests_dir, os.path.relpath(t, "tests")) for t in tests]
    try:
        # cwd outside the repository, so the mutated copy is the one imported.
        result = subprocess.run(
            command, cwd=package_parent, env=env, capture_output=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return 124
    return result.returncode


def _copy_folder(folder, commit, destination):
    """Copies the repository's `folder` into `destination`: as of `commit`, or
    the working tree's when `commit` is None."""
    os.makedirs(destination, exist_ok=True)
    if not commit:
        shutil.copytree(os.path.join(ROOT, folder), os.path.join(destination, folder))
        return
    archive = subprocess.run(
        ["git", "archive", commit, folder], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", destination], input=archive, check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=40, help="mutants to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=3600, help="seconds in all")
    parser.add_argument(
        "--timeout",
        type=float,
        help="seconds per mutant's test run (default: 3 x the unmutated run + 30; "
        "a run past it is retried once with three times as long)",
    )
    parser.add_argument("--tests", nargs="*", default=TESTS)
    parser.add_argument("--tests-from", help="a commit whose tests/ to run instead")
    parser.add_argument(
        "--package-from", help="a commit whose keras_gemma/ to mutate (default: the working tree)"
    )
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="mutation_")
    try:
        tests_dir = os.path.join(work, "tests")
        _copy_folder("tests", args.tests_from, work)
        tests = [t for t in args.tests if os.path.exists(os.path.join(work, t))]
        package = os.path.join(work, "pkg")
        _copy_folder("keras_gemma", args.package_from, package)
        # The unmutated sources, read from the copy that is mutated.
        sources = {t: open(os.path.join(package, t)).read() for t in TARGETS}

        start = time.time()
        if run_tests(package, tests_dir, tests, timeout=args.budget) != 0:
            sys.exit("The tests fail without any mutation; fix that first.")
        baseline = time.time() - start
        print(f"tests: {' '.join(tests)}; unmutated run {baseline:.0f} s", flush=True)

        candidates = []
        for target in TARGETS:
            source = sources[target]
            for index, (line, what) in enumerate(mutation_points(source)):
                candidates.append((target, index, line, what))
        random.Random(args.seed).shuffle(candidates)
        print(f"{len(candidates)} mutation points; sampling {args.sample}", flush=True)

        killed, survived, timed_out = [], [], []
        deadline = time.time() + args.budget
        for target, index, line, what in candidates[: args.sample]:
            if time.time() > deadline:
                print("time budget spent", flush=True)
                break
            path = os.path.join(package, target)
            original = sources[target]
            with open(path, "w") as f:
                f.write(mutate(original, index))
            limit = args.timeout or 3 * baseline + 30
            code = run_tests(package, tests_dir, tests, timeout=limit)
            if code == 124:
                # On a shared host a slow run is more often load than a
                # mutant that loops: a second, longer try tells them apart.
                code = run_tests(package, tests_dir, tests, timeout=3 * limit)
            with open(path, "w") as f:
                f.write(original)
            mutant = f"{target}:{line} {what}"
            if code == 124:
                timed_out.append(mutant)
            (killed if code != 0 else survived).append(mutant)
            verdict = "SURVIVED" if not code else "killed  " if code != 124 else "timeout "
            print(f"{verdict} {mutant}", flush=True)

        total = len(killed) + len(survived)
        print(f"\nscore: {len(killed)}/{total} killed ({100 * len(killed) / max(total, 1):.0f}%)")
        if timed_out:
            print(f"  ({len(timed_out)} of the killed by the time limit twice)")
        for mutant in timed_out:
            print("  timed out:", mutant)
        for mutant in survived:
            print("  survived:", mutant)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
