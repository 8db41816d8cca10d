"""Gemma's SentencePiece tokenizer, in plain Python.

The tokenizer runs eagerly on host strings and Python ints, so it works the
same under every Keras backend and needs no TensorFlow.
"""

import base64
import io
import numbers
import os
import pathlib

import keras
import numpy as np
import sentencepiece

from keras_gemma import checkpoints
from keras_gemma.presets import PRESETS

PAD_PIECE = "<pad>"
END_PIECE = "<eos>"
START_PIECE = "<bos>"
UNKNOWN_PIECE = "<unk>"
START_OF_TURN_PIECE = "<start_of_turn>"
END_OF_TURN_PIECE = "<end_of_turn>"

# Gemma's real vocabulary uses these ids; `train_sentencepiece` reproduces
# them so tiny demo vocabularies are interchangeable with the real one.
_PAD_ID, _END_ID, _START_ID, _UNKNOWN_ID = 0, 1, 2, 3
# User-defined symbols are numbered right after the four control pieces
# above, in this order, so their ids stay stable whatever the corpus.
_USER_DEFINED_PIECES = ("<mask>", START_OF_TURN_PIECE, END_OF_TURN_PIECE)

_ACCEPTED_TEXT = "a str, bytes, or a list/tuple/1-D numpy array of them"


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaTokenizer:
    """Gemma tokenizer built on a SentencePiece model.

    Turns text into integer token ids and back. It does not add `<bos>` or
    `<eos>`; the preprocessor does that when it packs model inputs.

    Args:
        proto: A path (`str` or `pathlib.Path`) to a SentencePiece model file
            (`.model`/`.spm`), or the serialized model as `bytes`. The
            vocabulary must contain the `<pad>`, `<bos>` and `<eos>` pieces.

    Attributes:
        pad_token_id: Id of `<pad>` (0 in Gemma vocabularies).
        end_token_id: Id of `<eos>` (1 in Gemma vocabularies).
        start_token_id: Id of `<bos>` (2 in Gemma vocabularies).
        start_of_turn_id: Id of `<start_of_turn>`, or `None` if the
            vocabulary lacks it.
        end_of_turn_id: Id of `<end_of_turn>`, or `None` if the vocabulary
            lacks it.
        proto: The serialized SentencePiece model, as `bytes`.

    Example:

    >>> from keras_gemma.tokenizer import GemmaTokenizer, train_sentencepiece
    >>> corpus = ["What is 3 plus 4? 3 plus 4 is 7."] * 50
    >>> tokenizer = GemmaTokenizer(train_sentencepiece(corpus, 280))
    >>> ids = tokenizer("3 plus 4")
    >>> tokenizer.detokenize(ids)
    '3 plus 4'
    >>> tokenizer.pad_token_id, tokenizer.end_token_id, tokenizer.start_token_id
    (0, 1, 2)
    """

    def __init__(self, proto):
        self._proto = _read_proto(proto)
        self._processor = _load_processor(self._proto)
        self._vocabulary_size = self._processor.get_piece_size()

        self.pad_token_id = self._required_piece_id(PAD_PIECE)
        self.end_token_id = self._required_piece_id(END_PIECE)
        self.start_token_id = self._required_piece_id(START_PIECE)
        self.start_of_turn_id = self._optional_piece_id(START_OF_TURN_PIECE)
        self.end_of_turn_id = self._optional_piece_id(END_OF_TURN_PIECE)

    @property
    def proto(self):
        """The serialized SentencePiece model, as `bytes`."""
        return self._proto

    def vocabulary_size(self):
        """Returns the number of pieces in the vocabulary."""
        return self._vocabulary_size

    def get_vocabulary(self):
        """Returns all pieces as a list of `str`, indexed by token id."""
        return [self._processor.id_to_piece(i) for i in range(self._vocabulary_size)]

    def id_to_token(self, id):
        """Returns the piece (`str`) for a token id."""
        self._check_ids([id])
        return self._processor.id_to_piece(int(id))

    def token_to_id(self, token):
        """Returns the token id of a piece, e.g. `"<eos>"` -> 1."""
        token_id = self._optional_piece_id(token)
        if token_id is None:
            raise ValueError(
                f"The token {token!r} is not in the vocabulary of {self._vocabulary_size} pieces."
            )
        return token_id

    def tokenize(self, inputs):
        """Splits text into token ids.

        Args:
            inputs: A `str` (or UTF-8 `bytes`), or a list, tuple or 1-D numpy
                array of them.

        Returns:
            A `list[int]` for a single string, or a `list[list[int]]` with one
            row per string for a batch. Rows are not padded.
        """
        if isinstance(inputs, np.ndarray) and inputs.ndim == 0:
            inputs = inputs.item()
        if isinstance(inputs, (str, bytes)):
            return self._processor.encode(_as_text(inputs), out_type=int)
        if isinstance(inputs, np.ndarray) and inputs.ndim != 1:
            raise ValueError(
                "`tokenize()` accepts a numpy array of strings only when it "
                f"is 1-D; received an array of shape {inputs.shape}."
            )
        batch = isinstance(inputs, (list, tuple, np.ndarray))
        wrong = [x for x in (inputs if batch else [inputs]) if not isinstance(x, (str, bytes))]
        if wrong:
            raise TypeError(
                f"`tokenize()` expects {_ACCEPTED_TEXT}; received "
                f"{'a batch containing ' if batch else ''}an object of type "
                f"{type(wrong[0]).__name__}."
            )
        return self._processor.encode([_as_text(item) for item in inputs], out_type=int)

    def __call__(self, inputs):
        return self.tokenize(inputs)

    def detokenize(self, ids):
        """Turns token ids back into text.

        Control tokens (`<pad>`, `<bos>`, `<eos>`) decode to nothing, so
        padded rows detokenize cleanly.

        Args:
            ids: A 1-D sequence of ints, or a 2-D batch of them: a list of
                lists (rows may differ in length), a numpy array or a backend
                tensor.

        Returns:
            A `str` for a 1-D input, or a `list[str]` for a 2-D input.
        """
        if isinstance(ids, (list, tuple)):
            is_row = [isinstance(x, (list, tuple)) or len(getattr(x, "shape", ())) > 0 for x in ids]
            if ids and all(is_row):
                return [self._decode(row) for row in ids]
            if any(is_row):
                raise ValueError(
                    "`detokenize()` received a list that mixes token ids and "
                    "sequences of token ids; pass a flat list of ids or a "
                    "list of rows."
                )
        array = _to_numpy(ids)
        if array.ndim == 2:
            return [self._decode(row) for row in array]
        if array.ndim > 2:
            raise ValueError(
                "`detokenize()` expects a 1-D or 2-D array of token ids; "
                f"received shape {array.shape}."
            )
        # A 0-D array is a single token id.
        return self._decode(array.reshape(-1))

    presets = PRESETS  # read-only {name: metadata} of the Gemma 1 presets

    @classmethod
    def from_preset(cls, preset, load_weights=True, dtype=None, **kwargs):
        """The preset's vocabulary (`load_weights` and `dtype` do not apply)."""
        return checkpoints.load_tokenizer(cls, preset)

    def save_to_preset(self, preset_dir):
        """Writes tokenizer.json and assets/tokenizer/vocabulary.spm, atomically."""
        checkpoints.save_tokenizer(self, preset_dir)

    def get_config(self):
        # Base64 keeps the config JSON-serializable, so the vocabulary travels
        # inside a saved `.keras` file without a separate asset.
        return {"proto": base64.b64encode(self._proto).decode("ascii")}

    @classmethod
    def from_config(cls, config):
        return cls(proto=base64.b64decode(config["proto"]))

    def __repr__(self):
        return f"GemmaTokenizer(vocabulary_size={self._vocabulary_size})"

    def _decode(self, row):
        ids = _to_numpy(row)
        if ids.ndim != 1:
            raise ValueError(f"Each row of token ids must be 1-D; received shape {ids.shape}.")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"Token ids must be integers; received an array of dtype {ids.dtype}.")
        ids = ids.tolist()
        self._check_ids(ids)
        return self._processor.decode(ids)

    def _check_ids(self, ids):
        for token_id in ids:
            if not isinstance(token_id, numbers.Integral) or isinstance(token_id, bool):
                raise TypeError(
                    "Token ids must be integers; received "
                    f"{token_id!r} of type {type(token_id).__name__}."
                )
            if not 0 <= token_id < self._vocabulary_size:
                raise ValueError(
                    f"Token id {token_id} is outside the vocabulary; valid ids "
                    f"are 0 to {self._vocabulary_size - 1}."
                )

    def _optional_piece_id(self, piece):
        # SentencePiece maps unknown pieces to the `<unk>` id instead of
        # failing, so check that the id really belongs to `piece`.
        token_id = self._processor.piece_to_id(piece)
        if self._processor.id_to_piece(token_id) != piece:
            return None
        return token_id

    def _required_piece_id(self, piece):
        token_id = self._optional_piece_id(piece)
        if token_id is None:
            raise ValueError(
                f"The SentencePiece vocabulary has no {piece!r} piece, which "
                "Gemma needs. Train the vocabulary with `<pad>`, `<eos>` and "
                "`<bos>` pieces (see `train_sentencepiece`)."
            )
        return token_id


def train_sentencepiece(texts, vocabulary_size=512):
    """Trains a small Gemma-style SentencePiece vocabulary.

    Meant for tests and tiny demo models, not for real training corpora. The
    settings mirror Gemma's vocabulary: BPE, digits split into single tokens,
    byte fallback (so any UTF-8 text round-trips), whitespace kept verbatim,
    `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3, followed by the user-defined
    pieces `<mask>`=4, `<start_of_turn>`=5 and `<end_of_turn>`=6. Training is
    single-threaded, so the same texts give the same bytes every time.

    Args:
        texts: An iterable of `str`, one sentence or document each.
        vocabulary_size: Exact number of pieces. Must be larger than the 263
            fixed pieces (256 byte pieces plus 7 special ones) plus the
            number of distinct characters in `texts`, and small enough for
            the corpus to supply that many merges.

    Returns:
        The serialized model as `bytes`, ready for `GemmaTokenizer(proto)`.

    Example:

    >>> proto = train_sentencepiece(["the cat sat on the mat"] * 20, 290)
    >>> GemmaTokenizer(proto).vocabulary_size()
    290
    """
    texts = list(texts)
    wrong = [text for text in texts if not isinstance(text, str)]
    if wrong:
        raise TypeError(
            "`train_sentencepiece()` expects an iterable of str; found an "
            f"element of type {type(wrong[0]).__name__}."
        )
    if not any(texts):
        raise ValueError("`train_sentencepiece()` needs non-empty texts.")

    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocabulary_size,
            character_coverage=1.0,
            split_digits=True,
            byte_fallback=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            normalization_rule_name="identity",
            pad_id=_PAD_ID,
            eos_id=_END_ID,
            bos_id=_START_ID,
            unk_id=_UNKNOWN_ID,
            pad_piece=PAD_PIECE,
            eos_piece=END_PIECE,
            bos_piece=START_PIECE,
            unk_piece=UNKNOWN_PIECE,
            user_defined_symbols=list(_USER_DEFINED_PIECES),
            # One thread makes merge order, and so the output, reproducible.
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise ValueError(f"SentencePiece training failed: {error}") from None
    return model.getvalue()


def _read_proto(proto):
    if isinstance(proto, (bytes, bytearray, memoryview)):
        return bytes(proto)
    if isinstance(proto, (str, os.PathLike)):
        path = pathlib.Path(proto)
        if not path.is_file():
            problem = "is a directory" if path.is_dir() else "does not exist"
            raise FileNotFoundError(
                f"Gemma vocabulary file {str(path)!r} {problem}; expected a "
                "SentencePiece model file (.model or .spm)."
            )
        return path.read_bytes()
    raise TypeError(
        "`proto` must be a path (str or pathlib.Path) to a SentencePiece "
        "model file, or the serialized model as bytes; received an object "
        f"of type {type(proto).__name__}."
    )


def _load_processor(proto):
    # Empty bytes would parse as a model with no pieces (and log an error).
    try:
        processor = sentencepiece.SentencePieceProcessor(model_proto=proto) if proto else None
    except RuntimeError:
        processor = None
    if processor is None or processor.get_piece_size() == 0:
        raise ValueError(
            f"`proto` ({len(proto)} bytes) is not a trained SentencePiece model: it could "
            "not be parsed as a SentencePiece ModelProto with pieces."
        )
    return processor


def _as_text(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


def _to_numpy(value):
    if isinstance(value, (np.ndarray, numbers.Integral, list, tuple)):
        return np.asarray(value)
    try:
        return np.asarray(keras.ops.convert_to_numpy(value))
    except Exception:
        raise TypeError(
            "`detokenize()` expects token ids as a list, numpy array or "
            f"tensor; received an object of type {type(value).__name__}."
        ) from None
