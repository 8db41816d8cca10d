"""Supervised fine-tuning in Gemma's turn format, loss on the model's turns only.

Usage:

    python training/sft.py --preset PRESET --data train.jsonl --output runs/sft \
        [--lora-rank 8] [--backend jax] [--steps 500] [--batch-size 32]
        [--learning-rate 1e-3] [--sequence-length 64] [--model-parallel N]

    # A real preset, LoRA, 2B weights split over 8 devices (JAX):
    python training/sft.py --preset gemma_2b_en --lora-rank 8 --dtype bfloat16 \
        --model-parallel 8 --data train.jsonl --output runs/sft_2b
    # Data parallel on PyTorch:
    torchrun --nproc_per_node=2 training/sft.py --backend torch --preset ... --data ...

`--preset` is a preset name, `kaggle://`/`hf://` handle, or a directory (e.g.
`runs/pretrain/preset`). `--data` is JSONL, one example a line, in any of:

    {"messages": [{"role": "user", "content": "Q"}, {"role": "model", "content": "A"}]}
    {"prompt": "Q", "response": "A"}       {"question": "Q", "answer": "A"}

(or CSV/Parquet, read with `keras_gemma.load_dataset`; other field names
with `--prompt-field`/`--response-field`/`--messages-field`). Each example is
written in Gemma's turn format by the preprocessor, with the loss on the
model turns (each with its `<end_of_turn>`) only; a prompt/response pair is
one user turn and one model turn. `--packing` packs short examples together.
Resuming reads examples by index, so `--data` is a file (or a Hugging Face
dataset, `hf:...`); a TFDS split streams in order and must be exported to
JSONL first.
With `--lora-rank`, only rank-r adapters train; they are saved to
`adapter.lora.safetensors` and merged into `preset/`. Writes `preset/`,
`log.csv`, `curves.png` into `--output`; rerunning after a kill resumes from
the last epoch's backup and ends with the same weights.
"""

import argparse
import pathlib

import recipe_common  # sets the backend from --backend before Keras loads
from recipe_common import np

import keras_gemma


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    recipe_common.add_common_arguments(parser, steps=500, batch_size=32, learning_rate=1e-3)
    parser.add_argument("--preset", required=True, help="preset name, handle or directory")
    parser.add_argument("--data", type=pathlib.Path, required=True, help="JSONL examples")
    parser.add_argument("--lora-rank", type=int, default=0, help="0: train every weight")
    parser.add_argument(
        "--lora-targets",
        default="query,value",
        help="comma-separated projections that get adapters (with --lora-rank)",
    )
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the preset's)")
    parser.add_argument(
        "--packing",
        action="store_true",
        help="pack several examples into each row of --sequence-length (attention and "
        "positions stay per example); --batch-size still counts examples",
    )
    parser.add_argument("--prompt-field", help="the data's prompt field (default: inferred)")
    parser.add_argument("--response-field", help="the data's response field")
    parser.add_argument("--messages-field", help="the data's conversation field")
    return parser.parse_args(argv)


def as_conversations(batch):
    """A raw batch from `load_dataset` as `{"messages": ...}` in turn form.

    Prompt/response pairs become one user turn and one model turn, so the
    preprocessor writes them with Gemma's template and puts the loss on the
    model turn (with its `<end_of_turn>`) only.
    """
    if "messages" in batch:
        return batch
    if "prompts" in batch:
        return {
            "messages": [
                [{"role": "user", "content": p}, {"role": "model", "content": r}]
                for p, r in zip(batch["prompts"], batch["responses"])
            ]
        }
    raise ValueError(
        "SFT needs prompts and responses or conversations; this data is plain text "
        "(use pretrain.py, or name the fields with --prompt-field/--response-field)."
    )


def read_sft_data(path, prompt_field=None, response_field=None, messages_field=None):
    """`keras_gemma.load_dataset` over a JSONL/CSV/Parquet file, read by index.

    Without field names, `messages`, then `prompt`/`response`, then
    `question`/`answer` (the toy tasks' layout) are looked for.
    """
    fields = {}
    if prompt_field or response_field or messages_field:
        fields = {
            "prompt_field": prompt_field,
            "response_field": response_field,
            "messages_field": messages_field,
        }
    try:
        dataset = keras_gemma.load_dataset(str(path), **fields)
    except ValueError:
        if fields:
            raise
        dataset = keras_gemma.load_dataset(
            str(path), prompt_field="question", response_field="answer"
        )
    if dataset.kind == "text":
        as_conversations({})  # raises the error that names the fix
    return dataset


class FixedRows:
    """Preprocesses a batch and pads or trims it to `rows` rows.

    With packing the number of rows varies with the examples' lengths; a
    fixed shape keeps one compiled train step on JAX and TensorFlow. Rows
    beyond `rows` (rare, with the margin `row_count` leaves) are dropped.
    """

    def __init__(self, preprocessor, rows):
        self.preprocessor, self.rows = preprocessor, rows

    def __call__(self, batch):
        x, y, weights = self.preprocessor(as_conversations(batch))
        if self.rows is None:
            return x, y, weights

        def fit(array):
            array = array[: self.rows]
            padding = [(0, self.rows - len(array))] + [(0, 0)] * (array.ndim - 1)
            return np.pad(array, padding)  # zeros: <pad> ids, no loss weight

        missing = self.rows - len(y)
        x, y, weights = {k: fit(v) for k, v in x.items()}, fit(y), fit(weights)
        if missing > 0:
            # An added row attends to one token, so it never takes a softmax
            # over nothing (NaN); it carries no loss weight.
            x["padding_mask"][-missing:, 0] = 1
            if "segment_ids" in x:
                x["segment_ids"][-missing:, 0] = 1
        return x, y, weights


def row_count(preprocessor, dataset, batch_size, sample=512):
    """Packed rows that hold `batch_size` typical examples, with a 15% margin."""
    batch = as_conversations(dataset.read(list(range(min(sample, len(dataset))))))
    lengths = [len(ids) - 1 for ids, _ in preprocessor.tokenize_examples(batch)]
    tokens = batch_size * sum(lengths) / len(lengths)
    return int(np.ceil(1.15 * tokens / preprocessor.sequence_length)) + 1


def load_model(args):
    kwargs = {"sequence_length": args.sequence_length}
    if args.dtype:
        kwargs["dtype"] = args.dtype
    return keras_gemma.GemmaCausalLM.from_preset(args.preset, **kwargs)


def main(argv=None, callbacks=()):
    """Runs the recipe; `callbacks` are extra Keras callbacks for `fit` (tests use them)."""
    args = parse_args(argv)
    preset = args.output / "preset"
    if (preset / "model.weights.h5").exists():
        print(f"{preset} exists: fine-tuning is done (delete it to train again).")
        return preset
    recipe_common.seed_everything(args.seed)
    cluster = recipe_common.setup_distribution(args.model_parallel)
    data = read_sft_data(args.data, args.prompt_field, args.response_field, args.messages_field)
    lm = load_model(args)
    rows = None
    if args.packing:
        lm.preprocessor.packing = True
        rows = row_count(lm.preprocessor, data, args.batch_size)
    if args.lora_rank:
        lm.backbone.enable_lora(args.lora_rank, target_layer_names=args.lora_targets.split(","))
    print(
        f"fine-tuning: {recipe_common.model_summary_line(lm)} examples={len(data)} "
        f"trainable={recipe_common.trainable_count(lm):,}"
    )
    batch_rows = FixedRows(lm.preprocessor, rows)
    recipe_common.train(lm, data, batch_rows, args, cluster, callbacks, "fine-tuning")
    recipe_common.save_result(lm, args, cluster, preset)
    return preset


if __name__ == "__main__":
    main()
