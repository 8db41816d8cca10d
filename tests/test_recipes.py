"""The training recipes in training/: a miniature of the toy pipeline (stage 1
and stage 2), each script's --help, the task checker, and resume after an
interruption.

The recipes run in this process (their `main(argv)`), on the backend the
suite runs on, so each backend is covered by its own pytest run.
"""

import csv
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

TRAINING = pathlib.Path(__file__).resolve().parents[1] / "training"
sys.path.insert(0, str(TRAINING))

import dpo  # noqa: E402
import evaluate  # noqa: E402
import preference_pairs  # noqa: E402
import pretrain  # noqa: E402
import recipe_common  # noqa: E402
import reward_model  # noqa: E402
import rlhf  # noqa: E402
import sft  # noqa: E402
import toy_pipeline  # noqa: E402
import toy_tasks  # noqa: E402
import train_tokenizer  # noqa: E402

from keras_gemma import GemmaCausalLM  # noqa: E402
from keras_gemma import format_turns  # noqa: E402


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """The tiny pipeline, both stages, run once for the module."""
    output = tmp_path_factory.mktemp("stage1")
    summary = toy_pipeline.main(
        ["--stage", "2", "--tiny", "--output", str(output), "--verbose", "0",
         "--save-preset", str(output / "ship")]
    )  # fmt: skip
    return output, summary


def test_miniature_pipeline_outputs(stage1):
    output, summary = stage1
    assert summary["backend"] == keras.config.backend()
    table = (output / "table.md").read_text()
    assert "| pretrained |" in table and "| sft |" in table and "| pretrain |" in table
    for model in ("pretrained", "sft"):
        tasks = summary[model]["tasks"]
        assert set(tasks) == {*toy_tasks.TASKS, "all"}
        assert all(0.0 <= t["exact_match"] <= 1.0 for t in tasks.values())
        assert np.isfinite(summary[model]["perplexity"])
    for run in ("pretrain", "sft"):
        with open(output / run / "log.csv") as file:
            rows = list(csv.DictReader(file))
        assert [int(r["epoch"]) for r in rows] == [0, 1]  # 10 steps, 5 per epoch
        assert all(np.isfinite(float(r["loss"])) for r in rows)
        assert (output / run / "preset" / "model.weights.h5").is_file()
        assert not (output / run / "backup").exists()  # removed once saved
    assert (output / "tokenizer" / "vocabulary.spm").is_file()
    predictions = toy_tasks.read_jsonl(output / "eval_sft" / "predictions.jsonl")
    assert len(predictions) == 5 * 8
    # The shipped copy: the best preset, its held-out questions, the command.
    ship = output / "ship"
    assert (ship / "model.weights.h5").is_file() and (ship / "heldout.jsonl").is_file()
    assert "toy_pipeline.py" in (ship / "README.md").read_text()


def test_miniature_stage2_outputs(stage1):
    output, summary = stage1
    table = (output / "table.md").read_text()
    for model in toy_pipeline.STAGE2_MODELS:
        assert f"| {model} |" in table
        assert set(summary[model]["tasks"]) == {*toy_tasks.TASKS, "all"}
        assert np.isfinite(summary[model]["reward"]) and np.isfinite(summary[model]["kl"])
    assert "pairwise accuracy" in table
    assert 0.0 <= summary["reward_model"]["accuracy"] <= 1.0
    # Every pair's chosen answer grades above its rejected one.
    for pair in toy_tasks.read_jsonl(output / "pairs" / "train.jsonl"):
        task, question = pair["task"], pair["prompt"]
        assert toy_tasks.score(task, question, pair["chosen"]) > toy_tasks.score(
            task, question, pair["rejected"]
        )
    for run in ("rlhf_reward_model", "rlhf_checker"):
        with open(output / run / "log.csv") as file:
            rows = list(csv.DictReader(file))
        assert [int(r["epoch"]) for r in rows] == [0, 1]
        for key in ("reward", "kl", "entropy", "completions/mean_length", "loss"):
            assert all(np.isfinite(float(r[key])) for r in rows), key
        assert (output / run / "samples.txt").read_text().startswith("=== epoch 1")
    # The SFT model is its own reference: KL 0 up to float error.
    assert abs(summary["sft"]["kl"]) < 1e-3
    # The shipped model is the best one, and only if it beat SFT.
    best = summary["best"]
    sft_match = summary["sft"]["tasks"]["all"]["exact_match"]
    if best == "sft":
        assert all(summary[m]["tasks"]["all"]["exact_match"] <= sft_match
                   for m in toy_pipeline.STAGE2_MODELS)  # fmt: skip
    else:
        assert summary[best]["tasks"]["all"]["exact_match"] > sft_match
    if importlib.util.find_spec("matplotlib"):
        assert (output / "stage2_curves.png").stat().st_size > 0


def test_rerun_after_completion_skips_training(stage1, capsys):
    output, _ = stage1
    preset = output / "sft" / "preset"
    before = preset.joinpath("model.weights.h5").stat().st_mtime_ns
    sft.main(
        ["--preset", str(output / "pretrain" / "preset"), "--data",
         str(output / "data" / "train.jsonl"), "--output", str(output / "sft")]
    )  # fmt: skip
    assert "fine-tuning is done" in capsys.readouterr().out
    assert preset.joinpath("model.weights.h5").stat().st_mtime_ns == before


class Interrupt(keras.callbacks.Callback):
    """Raises after `steps` training steps, as a kill would stop a run."""

    def __init__(self, steps):
        super().__init__()
        self.steps, self.seen = steps, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.steps:
            raise KeyboardInterrupt("interrupted for the test")


def _weights(preset):
    return [np.asarray(w) for w in GemmaCausalLM.from_preset(str(preset)).get_weights()]


def _assert_same_weights(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_pretrain_resumes_after_interruption_to_the_same_weights(stage1, tmp_path):
    output, _ = stage1

    def argv(run):
        return [
            "--vocabulary", str(output / "tokenizer" / "vocabulary.spm"),
            "--data", str(output / "data" / "pretrain.txt"), "--output", str(tmp_path / run),
            "--num-layers", "1", "--hidden-dim", "16", "--intermediate-dim", "32",
            "--num-query-heads", "2", "--head-dim", "8", "--sequence-length", "24",
            "--steps", "6", "--steps-per-epoch", "2", "--batch-size", "4",
            "--warmup-steps", "2", "--verbose", "0",
        ]  # fmt: skip

    pretrain.main(argv("straight"))
    # Killed mid-epoch (step 5 of 6): the rerun restores the backup of step 4,
    # replays step 5 and ends where the uninterrupted run ended.
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(argv("interrupted"), callbacks=[Interrupt(5)])
    assert (tmp_path / "interrupted" / "backup").exists()
    assert not (tmp_path / "interrupted" / "preset").exists()
    pretrain.main(argv("interrupted"))
    _assert_same_weights(
        _weights(tmp_path / "straight" / "preset"), _weights(tmp_path / "interrupted" / "preset")
    )
    with open(tmp_path / "interrupted" / "log.csv") as file:
        assert [int(r["epoch"]) for r in csv.DictReader(file)] == [0, 1, 2]


def test_sft_with_lora_resumes_after_interruption_to_the_same_weights(stage1, tmp_path):
    output, _ = stage1

    def argv(run):
        return [
            "--preset", str(output / "pretrain" / "preset"), "--lora-rank", "2",
            "--data", str(output / "data" / "train.jsonl"), "--output", str(tmp_path / run),
            "--steps", "4", "--steps-per-epoch", "2", "--batch-size", "4",
            "--warmup-steps", "1", "--sequence-length", "48", "--verbose", "0",
        ]  # fmt: skip

    sft.main(argv("straight"))
    with pytest.raises(KeyboardInterrupt):
        sft.main(argv("interrupted"), callbacks=[Interrupt(3)])
    sft.main(argv("interrupted"))
    _assert_same_weights(
        _weights(tmp_path / "straight" / "preset"), _weights(tmp_path / "interrupted" / "preset")
    )
    assert (tmp_path / "interrupted" / "adapter.lora.safetensors").is_file()


def length_reward(prompts, completions):
    """A reward that tells the miniature's samples apart (the checker gives
    its answers all 0, hence no gradient)."""
    return [float(len(c)) for c in completions]


def test_rlhf_with_lora_resumes_after_interruption_to_the_same_weights(stage1, tmp_path):
    output, _ = stage1

    def argv(run):
        return [
            "--preset", str(output / "sft" / "preset"), "--lora-rank", "2",
            "--prompts", str(output / "data" / "heldout.jsonl"),
            "--reward", f"{__name__}:length_reward",
            "--output", str(tmp_path / run), "--steps", "4", "--steps-per-epoch", "2",
            "--batch-size", "4", "--num-generations", "2", "--max-new-tokens", "4",
            "--learning-rate", "0.01", "--verbose", "0",
        ]  # fmt: skip

    rlhf.main(argv("straight"))
    with pytest.raises(KeyboardInterrupt):
        rlhf.main(argv("interrupted"), callbacks=[Interrupt(3)])
    assert (tmp_path / "interrupted" / "backup").exists()
    rlhf.main(argv("interrupted"))
    straight = _weights(tmp_path / "straight" / "preset")
    _assert_same_weights(straight, _weights(tmp_path / "interrupted" / "preset"))
    # And it trained: the merged adapters moved the weights.
    start = _weights(output / "sft" / "preset")
    assert any(not np.array_equal(a, b) for a, b in zip(start, straight))
    assert (tmp_path / "interrupted" / "adapter.lora.safetensors").is_file()


def test_rlhf_recipe_names_bad_input(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"question": "Q"}) + "\n" + json.dumps({"text": "Q"}) + "\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: .*'prompt' or 'question'"):
        rlhf.read_prompts(path)
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Q"},
                                 {"role": "assistant", "content": "A"}]}) + "\n"
    )  # fmt: skip
    with pytest.raises(ValueError, match="end on a user turn"):
        rlhf.read_prompts(path)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Q"}]}) + "\n")
    assert rlhf.read_prompts(path) == [format_turns([("user", "Q")])]
    with pytest.raises(SystemExit, match="neither a directory nor module:function"):
        rlhf.load_reward(str(tmp_path / "missing"))
    with pytest.raises(SystemExit, match="toy_tasks:nothing"):
        rlhf.load_reward("toy_tasks:nothing")
    assert rlhf.load_reward("toy_tasks:reward") is toy_tasks.reward


def test_preference_pairs_best_against_worst():
    examples = [
        {"task": "add", "question": "What is 2 + 3?", "answer": "5"},
        {"task": "add", "question": "What is 4 + 4?", "answer": "8"},
        {"task": "sort", "question": "Sort from smallest to largest: 3 1 2", "answer": "1 2 3"},
    ]
    answers = [["4", "5", "cat", "5"], ["9", "9", "9", "9"], ["1 3 2", "3 1 2", "1 2 4"]]
    pairs = preference_pairs.make_pairs(examples, answers)
    # Equal grades give no pair; "1 2 4" (2 of 3 in place) beats "3 1 2" (none).
    assert pairs == [
        {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "cat", "task": "add"},
        {"prompt": examples[2]["question"], "chosen": "1 2 4", "rejected": "3 1 2",
         "task": "sort"},
    ]  # fmt: skip
    with_reference = preference_pairs.make_pairs(examples, answers, add_reference=True)
    assert with_reference[1] == {
        "prompt": "What is 4 + 4?", "chosen": "8", "rejected": "9", "task": "add"
    }  # fmt: skip


def test_step_batches_depend_only_on_the_step():
    examples = [str(i) for i in range(10)]
    batches = recipe_common.StepBatches(examples, lambda batch: batch, 4, 3, seed=1)
    first = [batches.indices(step).tolist() for step in range(6)]
    # A fresh dataset, as after a restart, gives the same batches.
    again = recipe_common.StepBatches(examples, lambda batch: batch, 4, 3, seed=1)
    assert [again.indices(step).tolist() for step in reversed(range(6))] == first[::-1]
    # Every pass over the data sees each example once.
    stream = sum(first, [])
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    # Data parallel: the ranks' shares make up the global batch.
    shares = [
        recipe_common.StepBatches(examples, list, 4, 3, seed=1, rank=r, world_size=2).indices(2)
        for r in (0, 1)
    ]
    assert np.concatenate(shares).tolist() == first[2]


@pytest.mark.parametrize(
    "module",
    [
        toy_tasks,
        train_tokenizer,
        pretrain,
        sft,
        evaluate,
        toy_pipeline,
        preference_pairs,
        reward_model,
        rlhf,
        dpo,
    ],
)
def test_help(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        if module is toy_tasks:
            module.main(["--help"])
        else:
            module.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_script_help_runs_standalone():
    # Scripts run from a plain checkout: the task generator imports no Keras.
    result = subprocess.run(
        [sys.executable, str(TRAINING / "toy_tasks.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--heldout" in result.stdout


def test_checker_and_reward():
    train, heldout = toy_tasks.make_splits(50, 10, seed=3)
    assert not {e["question"] for e in train} & {e["question"] for e in heldout}
    assert train == toy_tasks.make_splits(50, 10, seed=3)[0]  # fixed seed
    for example in train + heldout:
        assert toy_tasks.check(example["task"], example["question"], example["answer"])
        assert toy_tasks.score(example["task"], example["question"], example["answer"]) == 1.0
    assert toy_tasks.check("add", "What is 12 + 30?", " 42. ")
    assert not toy_tasks.check("add", "What is 12 + 30?", "43")
    assert 0 < toy_tasks.score("add", "What is 12 + 30?", "43") < 0.5
    assert toy_tasks.score("add", "What is 12 + 30?", "forty") == 0.0
    question = "Sort from smallest to largest: 5 1 3"
    assert toy_tasks.score("sort", question, "1 3 5") == 1.0
    assert toy_tasks.score("sort", question, "1 5 3") == pytest.approx(0.5 / 3)
    assert toy_tasks.solve("count", 'How many times does the letter r appear in "berry"?') == "2"
    # As an RLHF reward: the task is read from the question inside the turn format.
    for example in heldout:
        assert toy_tasks.task_of(example["question"]) == example["task"]
    prompts = [format_turns([("user", e["question"])]) for e in heldout]
    answers = [e["answer"] if i % 2 else "0" for i, e in enumerate(heldout)]
    expected = [toy_tasks.score(e["task"], e["question"], a) for e, a in zip(heldout, answers)]
    assert toy_tasks.reward(prompts, answers) == expected
    with pytest.raises(ValueError, match="Not a toy-task question"):
        toy_tasks.task_of("What is the capital of France?")


def test_sft_reads_every_data_layout(tmp_path):
    layouts = {
        "toy": {"question": "Q1", "answer": "A1"},
        "pairs": {"prompt": "Q1", "response": "A1"},
        "chat": {"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Q1"},
                              {"role": "assistant", "content": "A1"}]},
    }  # fmt: skip
    for name, row in layouts.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        dataset = sft.read_sft_data(path)
        (conversation,) = sft.as_conversations(dataset.read([0]))["messages"]
        assert conversation[-1]["content"] == "A1"
    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps({"text": "just text"}) + "\n")
    with pytest.raises(ValueError, match="plain text"):
        sft.read_sft_data(path)


def test_sft_packing_keeps_one_shape(stage1):
    output, _ = stage1
    lm = GemmaCausalLM.from_preset(str(output / "pretrain" / "preset"), sequence_length=64)
    lm.preprocessor.packing = True
    dataset = sft.read_sft_data(output / "data" / "train.jsonl")
    rows = sft.row_count(lm.preprocessor, dataset, batch_size=16)
    to_batch = sft.FixedRows(lm.preprocessor, rows)
    for start in (0, 16, 32):
        x, y, weights = to_batch(dataset.read(list(range(start, start + 16))))
        assert x["token_ids"].shape == y.shape == weights.shape == (rows, 64)
        assert x["padding_mask"][:, 0].all()  # no row attends to nothing
    # The loss covers the model turns: fewer weighted tokens than real ones.
    assert 0 < weights.sum() < x["padding_mask"].sum()
    logits = lm(x)
    assert np.isfinite(keras.ops.convert_to_numpy(logits)).all()


@pytest.mark.skipif(keras.config.backend() != "jax", reason="keras.distribution is JAX's")
def test_sft_model_parallel_on_simulated_devices(stage1, tmp_path):
    # A fresh process: the device count is fixed when JAX starts.
    output, _ = stage1
    result = subprocess.run(
        [sys.executable, str(TRAINING / "sft.py"), "--backend", "jax", "--model-parallel", "2",
         "--preset", str(output / "pretrain" / "preset"), "--lora-rank", "2",
         "--data", str(output / "data" / "train.jsonl"), "--output", str(tmp_path),
         "--steps", "2", "--steps-per-epoch", "1", "--batch-size", "8", "--verbose", "0",
         "--sequence-length", "48"],
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "preset" / "model.weights.h5").is_file()
