"""Pretrains a Gemma from scratch on raw text (next-token loss on every token).

Usage:

    python training/pretrain.py --vocabulary VOCAB.spm --data corpus.txt \
        --output runs/pretrain [--backend jax] [--config config.json | size flags]
        [--steps 1000] [--steps-per-epoch 50] [--batch-size 32] [--learning-rate 1e-3]

`--data` is a text file with one document per line. The model's size comes
from `--config` (a JSON dict of `GemmaBackbone` arguments, e.g. the
`config` of a preset's config.json) or from the size flags. Writes into
`--output`: `preset/` (a Keras preset: `GemmaCausalLM.from_preset(dir)`),
`log.csv`, `curves.png` and, while training, `backup/`. Rerunning the same
command after a kill resumes from the last epoch's backup and ends with the
same weights as an uninterrupted run; once `preset/` exists the run is done
and a rerun only reports it.
"""

import argparse
import json
import pathlib

import recipe_common  # sets the backend from --backend before Keras loads
from recipe_common import np

import keras_gemma


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    recipe_common.add_common_arguments(parser, steps=1000, batch_size=32, learning_rate=1e-3)
    parser.add_argument("--vocabulary", type=pathlib.Path, required=True, help="SentencePiece file")
    parser.add_argument("--data", type=pathlib.Path, required=True, help="text, a document a line")
    parser.add_argument("--config", type=pathlib.Path, help="JSON of GemmaBackbone arguments")
    size = parser.add_argument_group("model size (ignored with --config)")
    size.add_argument("--num-layers", type=int, default=4)
    size.add_argument("--hidden-dim", type=int, default=128)
    size.add_argument("--intermediate-dim", type=int, default=512)
    size.add_argument("--num-query-heads", type=int, default=4)
    size.add_argument("--num-key-value-heads", type=int, default=1)
    size.add_argument("--head-dim", type=int, default=32)
    return parser.parse_args(argv)


def backbone_config(args, vocabulary_size):
    if args.config:
        config = json.loads(args.config.read_text())
        # A preset's config.json nests the arguments under "config".
        config = config.get("config", config)
        config = {k: v for k, v in config.items() if k not in ("name", "trainable", "dtype")}
        config["vocabulary_size"] = vocabulary_size
        return config
    return {
        "vocabulary_size": vocabulary_size,
        "num_layers": args.num_layers,
        "num_query_heads": args.num_query_heads,
        "num_key_value_heads": args.num_key_value_heads,
        "hidden_dim": args.hidden_dim,
        "intermediate_dim": args.intermediate_dim,
        "head_dim": args.head_dim,
    }


def pack_documents(tokenizer, texts, row_length):
    """Concatenates `<bos> document <eos>` into full rows of `row_length` ids.

    Short documents padded one per row would waste most of each batch, so
    pretraining reads the text as one stream, as GPT-style pretraining does
    (attention may cross a document boundary; `<bos>` marks each start).
    """
    stream = []
    for ids in tokenizer.tokenize(texts):
        stream.extend([tokenizer.start_token_id, *ids, tokenizer.end_token_id])
    count = len(stream) // row_length
    return np.asarray(stream[: count * row_length], "int32").reshape(count, row_length)


def rows_to_batch(rows):
    """Rows of `sequence_length + 1` ids to `(x, y, sample_weight)`."""
    rows = np.asarray(rows)
    x = {"token_ids": rows[:, :-1], "padding_mask": np.ones_like(rows[:, :-1])}
    return x, rows[:, 1:], np.ones(rows[:, 1:].shape, "float32")


def main(argv=None, callbacks=()):
    """Runs the recipe; `callbacks` are extra Keras callbacks for `fit` (tests use them)."""
    args = parse_args(argv)
    preset = args.output / "preset"
    if (preset / "model.weights.h5").exists():
        print(f"{preset} exists: pretraining is done (delete it to train again).")
        return preset
    recipe_common.seed_everything(args.seed)
    cluster = recipe_common.setup_distribution(args.model_parallel)

    tokenizer = keras_gemma.GemmaTokenizer(args.vocabulary)
    texts = [line for line in args.data.read_text(encoding="utf-8").splitlines() if line]
    rows = pack_documents(tokenizer, texts, args.sequence_length + 1)
    backbone = keras_gemma.GemmaBackbone(**backbone_config(args, tokenizer.vocabulary_size()))
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, args.sequence_length)
    lm = keras_gemma.GemmaCausalLM(backbone, preprocessor)
    print(
        f"pretraining: {recipe_common.model_summary_line(lm)} documents={len(texts)} "
        f"rows={len(rows)}x{args.sequence_length}"
    )

    recipe_common.train(lm, rows, rows_to_batch, args, cluster, callbacks, "pretraining")
    recipe_common.save_result(lm, args, cluster, preset)
    return preset


if __name__ == "__main__":
    main()
