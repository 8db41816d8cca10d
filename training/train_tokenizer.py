"""Trains a Gemma-style SentencePiece vocabulary on text files.

Usage:

    python training/train_tokenizer.py --data corpus.txt [more.txt ...] \
        --output runs/tokenizer [--vocabulary-size 384] [--backend jax]

Uses `keras_gemma.tokenizer.train_sentencepiece`, which sets Gemma's
vocabulary options: BPE, digits split into single tokens, byte fallback,
verbatim whitespace, and Gemma's special pieces at Gemma's ids (`<pad>`=0,
`<eos>`=1, `<bos>`=2, `<unk>`=3, `<mask>`=4, `<start_of_turn>`=5,
`<end_of_turn>`=6). Writes `vocabulary.spm`, `log.csv` (tokens per line,
pieces) and `curves.png` (a histogram of tokens per line) into `--output`.
Training is single-threaded and deterministic, so a rerun (after a kill too)
writes the same bytes; `--backend` is accepted for symmetry with the other
recipes (nothing here runs on it).
"""

import argparse
import csv
import pathlib

import recipe_common  # sets the backend from --backend before Keras loads

from keras_gemma.tokenizer import GemmaTokenizer
from keras_gemma.tokenizer import train_sentencepiece


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=pathlib.Path, nargs="+", required=True, help="text files")
    parser.add_argument("--output", type=pathlib.Path, required=True, help="run directory")
    parser.add_argument("--vocabulary-size", type=int, default=384)
    parser.add_argument("--max-lines", type=int, default=200_000, help="lines read per file")
    parser.add_argument("--backend", choices=recipe_common.BACKENDS, default=None)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    texts = []
    for path in args.data:
        lines = path.read_text(encoding="utf-8").splitlines()[: args.max_lines]
        texts.extend(line for line in lines if line)
    proto = train_sentencepiece(texts, vocabulary_size=args.vocabulary_size)
    tokenizer = GemmaTokenizer(proto)  # checks the special pieces before writing
    args.output.mkdir(parents=True, exist_ok=True)
    vocabulary = args.output / "vocabulary.spm"
    temporary = vocabulary.with_suffix(".tmp")
    temporary.write_bytes(proto)
    temporary.replace(vocabulary)  # atomic: a kill never leaves half a file

    lengths = [len(ids) for ids in tokenizer.tokenize(texts)]
    with open(args.output / "log.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["pieces", "lines", "mean_tokens", "max_tokens", "characters_per_token"])
        characters = sum(len(t) for t in texts)
        writer.writerow(
            [
                tokenizer.vocabulary_size(),
                len(texts),
                round(sum(lengths) / len(lengths), 2),
                max(lengths),
                round(characters / sum(lengths), 3),
            ]
        )
    plot_lengths(lengths, args.output / "curves.png")
    print(
        f"wrote {vocabulary}: {tokenizer.vocabulary_size()} pieces, "
        f"{sum(lengths) / len(lengths):.1f} tokens per line (max {max(lengths)})"
    )
    return vocabulary


def plot_lengths(lengths, png_path):
    plt = recipe_common.pyplot(png_path)
    if plt is None:
        return
    figure, axis = plt.subplots(figsize=(4, 3))
    axis.hist(lengths, bins=30)
    axis.set_xlabel("tokens per line")
    recipe_common.save_figure(plt, figure, png_path)


if __name__ == "__main__":
    main()
