"""The main job: load the small Gemma our toy pipeline trained, ask it held-out
questions, stream an answer, then teach it something new with LoRA.

    KERAS_BACKEND=jax python training/demo.py [--seconds 60] [--preset DIR]

The preset (`presets/toy_gemma`, made by `training/toy_pipeline.py --stage 2`;
its README has the command and the table) was pretrained from scratch on
checkable toy tasks, fine-tuned in Gemma's turn format, then tuned by RLHF
(RLOO with a KL penalty toward the SFT model). The demo asks it questions it
never saw in training, with the task checker's verdict beside each answer,
streams one answer token by token, then LoRA-tunes it for about a minute on
a task it has never seen (the largest of a few numbers) and asks again.
"""

import argparse
import pathlib
import sys
import time

import keras

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A plain checkout runs without installing: the package and the task module.
sys.path[:0] = [str(ROOT), str(ROOT / "training")]

import toy_tasks  # noqa: E402

import keras_gemma  # noqa: E402

PRESET = ROOT / "presets" / "toy_gemma"


class StopAfter(keras.callbacks.Callback):
    """Ends training once a wall-clock budget is spent."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def on_train_begin(self, logs=None):
        self.start = None

    def on_train_batch_end(self, batch, logs=None):
        # The clock starts after the first step, so compiling is not counted.
        if self.start is None:
            self.start = time.perf_counter()
        elif time.perf_counter() - self.start > self.seconds:
            self.model.stop_training = True


def prompt(question):
    return keras_gemma.format_turns([("user", question)])


def ask(lm, examples, title):
    """Answers `examples` greedily and prints each with the checker's verdict."""
    print(f"\n== {title}")
    answers = lm.generate([prompt(e["question"]) for e in examples], strip_prompt=True)
    right = 0
    for example, answer in zip(examples, answers):
        correct = toy_tasks.check(example["task"], example["question"], answer)
        right += correct
        mark = "right" if correct else f"wrong, expected {example['answer']}"
        print(f"  {example['question']:58} -> {answer.strip():14} ({mark})")
    print(f"  {right}/{len(examples)} right")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="LoRA fine-tuning budget")
    parser.add_argument("--preset", default=str(PRESET), help="preset directory or name")
    args = parser.parse_args()
    keras.utils.set_random_seed(0)

    lm = keras_gemma.GemmaCausalLM.from_preset(args.preset)
    print(f"backend={keras.config.backend()}  parameters={lm.backbone.count_params():,}")

    # The held-out questions the pipeline saved with the preset: never trained on.
    heldout_path = pathlib.Path(args.preset) / "heldout.jsonl"
    if not heldout_path.exists():  # a preset given by name: use the shipped copy
        heldout_path = PRESET / "heldout.jsonl"
    heldout = toy_tasks.read_jsonl(heldout_path)
    ask(lm, heldout[::25], "held-out questions")

    example = next(e for e in heldout if e["task"] == "sort")
    print(f"\n== streaming: {example['question']}\n  ", end="")
    pieces = []
    for piece in lm.generate_stream(prompt(example["question"])):
        print(piece, end="", flush=True)
        pieces.append(piece)
    verdict = toy_tasks.check(example["task"], example["question"], "".join(pieces))
    print(f"   ({'right' if verdict else 'wrong'})")

    # Something new: the largest of a few numbers, a task absent from training.
    train, new_heldout = toy_tasks.make_splits(3000, 10, seed=1, tasks=toy_tasks.NEW_TASKS)
    ask(lm, new_heldout, "a new task, before LoRA")
    lm.backbone.enable_lora(rank=4)
    lm.compile(optimizer=keras.optimizers.Adam(5e-3))
    data = {
        "prompts": [prompt(e["question"]) for e in train],
        "responses": [e["answer"] + "<end_of_turn>" for e in train],
    }
    start = time.perf_counter()
    history = lm.fit(data, batch_size=32, epochs=1, verbose=0, callbacks=[StopAfter(args.seconds)])
    steps = lm.optimizer.iterations.numpy()
    print(
        f"\nLoRA rank 4: {steps} steps in {time.perf_counter() - start:.0f}s, "
        f"loss {history.history['loss'][-1]:.3f}"
    )
    ask(lm, new_heldout, "the new task, after LoRA")


if __name__ == "__main__":
    main()
