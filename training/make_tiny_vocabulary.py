"""Trains the tiny Gemma-style SentencePiece vocabulary for the demo preset.

The vocabulary is trained on `training/data/tiny_corpus.txt` (written by
`make_tiny_dataset.py`) with the same settings as Gemma's real vocabulary:
BPE, split digits, byte fallback, verbatim whitespace, `<pad>`=0, `<eos>`=1,
`<bos>`=2, `<unk>`=3, `<mask>`=4, `<start_of_turn>`=5, `<end_of_turn>`=6.
Training is deterministic, so rerunning it rewrites identical bytes.

Usage:
    python training/make_tiny_vocabulary.py [OUTPUT_PATH]
        [--corpus PATH] [--vocabulary-size N]

OUTPUT_PATH defaults to `presets/tiny/vocabulary.spm`.
"""

import argparse
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# Lets the script run as `python training/make_tiny_vocabulary.py` from a
# plain checkout, without installing the package.
sys.path.insert(0, str(REPO_ROOT))

from keras_gemma.tokenizer import GemmaTokenizer  # noqa: E402
from keras_gemma.tokenizer import train_sentencepiece  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "output",
        nargs="?",
        type=pathlib.Path,
        default=REPO_ROOT / "presets" / "tiny" / "vocabulary.spm",
        help="where to write the SentencePiece model",
    )
    parser.add_argument(
        "--corpus",
        type=pathlib.Path,
        default=REPO_ROOT / "training" / "data" / "tiny_corpus.txt",
        help="text file to train on, one example per line",
    )
    parser.add_argument(
        "--vocabulary-size",
        type=int,
        default=512,
        help="number of pieces in the vocabulary (default: 512)",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    texts = args.corpus.read_text(encoding="utf-8").splitlines()
    proto = train_sentencepiece(texts, vocabulary_size=args.vocabulary_size)

    # Loading it back checks the Gemma special pieces before anything is
    # written.
    tokenizer = GemmaTokenizer(proto)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(proto)
    print(
        f"Wrote {args.output} ({len(proto)} bytes, "
        f"{tokenizer.vocabulary_size()} pieces; pad={tokenizer.pad_token_id} "
        f"eos={tokenizer.end_token_id} bos={tokenizer.start_token_id} "
        f"start_of_turn={tokenizer.start_of_turn_id} "
        f"end_of_turn={tokenizer.end_of_turn_id})"
    )


if __name__ == "__main__":
    main()
