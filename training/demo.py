"""The main job: build a small Gemma, generate, fine-tune on the bundled
instruction data for about a minute, and generate again.

    KERAS_BACKEND=jax python training/demo.py [--seconds 60]

The model starts from random weights (no downloads here), so its first
answers are noise; after supervised fine-tuning on `training/data/tiny_sft.jsonl`
in Gemma's chat format it answers in the data's style.
"""

import argparse
import json
import pathlib
import time

import keras

import keras_gemma

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = ["What color is a banana?", "What is 2 plus 3?", "Translate dog to French."]


def chat_turn(prompt):
    return f"<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n"


class StopAfter(keras.callbacks.Callback):
    """Ends training once a wall-clock budget is spent."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if time.perf_counter() - self.start > self.seconds:
            self.model.stop_training = True


def show(lm, title):
    print(f"\n== {title}")
    batch = lm.preprocessor.generate_preprocess([chat_turn(p) for p in PROMPTS], 48)
    outputs = lm.generate(batch)
    answers = lm.preprocessor.generate_postprocess(
        outputs, strip_lengths=batch["padding_mask"].sum(axis=1)
    )
    new_tokens = outputs["padding_mask"].sum(axis=1) - batch["padding_mask"].sum(axis=1)
    for prompt, answer, count in zip(PROMPTS, answers, new_tokens):
        print(f"  {prompt!r:34} -> {answer.strip()!r} ({count} tokens)")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="fine-tuning budget")
    args = parser.parse_args()
    keras.utils.set_random_seed(0)

    tokenizer = keras_gemma.GemmaTokenizer(ROOT / "presets" / "tiny" / "vocabulary.spm")
    backbone = keras_gemma.GemmaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=1,
        hidden_dim=128,
        intermediate_dim=512,
        head_dim=32,
    )
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=48)
    lm = keras_gemma.GemmaCausalLM(backbone, preprocessor)
    print(f"backend={keras.config.backend()}  parameters={backbone.count_params():,}")
    lm.compile(optimizer=keras.optimizers.AdamW(3e-3, weight_decay=0.01))
    show(lm, "before fine-tuning (random weights)")

    rows = [json.loads(line) for line in (ROOT / "training/data/tiny_sft.jsonl").open()]
    data = {
        "prompts": [chat_turn(r["prompt"]) for r in rows],
        "responses": [r["response"] + "<end_of_turn>" for r in rows],
    }
    start = time.perf_counter()
    history = lm.fit(
        data, batch_size=16, epochs=1000, verbose=0, callbacks=[StopAfter(args.seconds)]
    )
    losses = history.history["loss"]
    print(
        f"\nfine-tuned {len(losses)} epochs in {time.perf_counter() - start:.0f}s: "
        f"loss {losses[0]:.2f} -> {losses[-1]:.2f}, "
        f"token accuracy {history.history['accuracy'][-1]:.0%}"
    )
    show(lm, "after fine-tuning")


if __name__ == "__main__":
    main()
