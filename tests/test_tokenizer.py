import json

import keras
import numpy as np
import pytest
from helpers import train_raw_sentencepiece

from keras_gemma.tokenizer import GemmaTokenizer
from keras_gemma.tokenizer import train_sentencepiece

ROUND_TRIP_STRINGS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 plus 30? 12 plus 30 is 42.",
    "Phone: 555-0199, year 2024, pi 3.14159",
    "two  spaces,   three spaces,\ttab",
    "  leading and trailing whitespace  ",
    "line one\nline two\n\nafter a blank line\n",
    "emoji 😀🚀 and accents: café, naïve, Ωmega",
    "日本語のテキスト and 한국어",
    "<start_of_turn>user\nWhat color is a banana?<end_of_turn>\n",
    "",
]


@pytest.fixture
def tokenizer(vocab_proto):
    return GemmaTokenizer(vocab_proto)


def test_special_token_ids(tokenizer):
    assert tokenizer.pad_token_id == 0
    assert tokenizer.end_token_id == 1
    assert tokenizer.start_token_id == 2
    assert tokenizer.id_to_token(0) == "<pad>"
    assert tokenizer.id_to_token(1) == "<eos>"
    assert tokenizer.id_to_token(2) == "<bos>"
    assert tokenizer.id_to_token(3) == "<unk>"
    assert tokenizer.start_of_turn_id == tokenizer.token_to_id("<start_of_turn>")
    assert tokenizer.end_of_turn_id == tokenizer.token_to_id("<end_of_turn>")
    assert (tokenizer.start_of_turn_id, tokenizer.end_of_turn_id) == (5, 6)


def test_turn_markers_are_single_tokens(tokenizer):
    assert tokenizer.tokenize("<start_of_turn>") == [tokenizer.start_of_turn_id]
    assert tokenizer.tokenize("<end_of_turn>") == [tokenizer.end_of_turn_id]
    ids = tokenizer.tokenize("<start_of_turn>model\nHi<end_of_turn>")
    assert ids[0] == tokenizer.start_of_turn_id
    assert ids[-1] == tokenizer.end_of_turn_id
    assert ids.count(tokenizer.start_of_turn_id) == 1


def test_tokenize_adds_no_start_or_end_token(tokenizer):
    ids = tokenizer.tokenize("hello world")
    assert tokenizer.start_token_id not in ids
    assert tokenizer.end_token_id not in ids


@pytest.mark.parametrize("text", ROUND_TRIP_STRINGS)
def test_round_trip(tokenizer, text):
    ids = tokenizer.tokenize(text)
    assert all(isinstance(id, int) for id in ids)
    assert tokenizer.detokenize(ids) == text


def test_unseen_characters_use_byte_fallback(tokenizer):
    # None of these characters is in the training corpus.
    ids = tokenizer.tokenize("日😀")
    pieces = [tokenizer.id_to_token(id) for id in ids]
    assert pieces == [
        "<0xE6>",
        "<0x97>",
        "<0xA5>",
        "<0xF0>",
        "<0x9F>",
        "<0x98>",
        "<0x80>",
    ]
    assert tokenizer.token_to_id("<unk>") not in ids


def test_digits_are_split(tokenizer):
    ids = tokenizer.tokenize("in 1969 and 384400")
    digit_pieces = [
        piece for piece in map(tokenizer.id_to_token, ids) if any(c.isdigit() for c in piece)
    ]
    assert digit_pieces == list("1969384400")


def test_batch_tokenize(tokenizer):
    texts = ["hello world", "12 plus 30", ""]
    expected = [tokenizer.tokenize(text) for text in texts]
    assert tokenizer.tokenize(texts) == expected
    assert tokenizer.tokenize(tuple(texts)) == expected
    assert tokenizer.tokenize(np.array(texts)) == expected
    assert tokenizer.tokenize(np.array(texts, dtype=object)) == expected
    assert tokenizer.tokenize([t.encode("utf-8") for t in texts]) == expected
    assert tokenizer.tokenize([]) == []


def test_bytes_and_call(tokenizer):
    text = "café 42"
    assert tokenizer.tokenize(text.encode("utf-8")) == tokenizer.tokenize(text)
    assert tokenizer.tokenize(np.array(text)) == tokenizer.tokenize(text)
    assert tokenizer(text) == tokenizer.tokenize(text)


def test_detokenize_batch_and_tensors(tokenizer):
    texts = ["hello world", "What is 12 plus 30?"]
    rows = tokenizer.tokenize(texts)
    assert tokenizer.detokenize(rows) == texts
    assert tokenizer.detokenize(tuple(tuple(row) for row in rows)) == texts

    # Padded, model-shaped ids: bos/eos/pad are control tokens that decode
    # to nothing.
    length = max(len(row) for row in rows) + 3
    padded = np.zeros((len(rows), length), dtype="int32")
    for i, row in enumerate(rows):
        packed = [tokenizer.start_token_id, *row, tokenizer.end_token_id]
        padded[i, : len(packed)] = packed
    assert tokenizer.detokenize(padded) == texts
    assert tokenizer.detokenize(keras.ops.convert_to_tensor(padded)) == texts
    assert tokenizer.detokenize(list(padded)) == texts

    single = keras.ops.convert_to_tensor(np.array(rows[0], dtype="int32"))
    assert tokenizer.detokenize(single) == texts[0]
    scalars = [keras.ops.convert_to_tensor(id) for id in rows[0]]
    assert tokenizer.detokenize(scalars) == texts[0]
    assert tokenizer.detokenize(np.array(rows[0], dtype="int64")) == texts[0]
    assert tokenizer.detokenize([]) == ""


def test_vocabulary(tokenizer):
    vocabulary = tokenizer.get_vocabulary()
    assert tokenizer.vocabulary_size() == len(vocabulary) == 384  # conftest
    assert vocabulary[:7] == [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<mask>",
        "<start_of_turn>",
        "<end_of_turn>",
    ]
    for id, piece in enumerate(vocabulary):
        assert tokenizer.id_to_token(id) == piece
        assert tokenizer.token_to_id(piece) == id


def test_path_and_bytes_construction_agree(vocab_proto, tmp_path):
    path = tmp_path / "vocabulary.spm"
    path.write_bytes(vocab_proto)
    from_bytes = GemmaTokenizer(vocab_proto)
    text = "What is 12 plus 30?"
    for proto in [path, str(path), bytearray(vocab_proto)]:
        tokenizer = GemmaTokenizer(proto)
        assert tokenizer.proto == vocab_proto
        assert tokenizer.get_vocabulary() == from_bytes.get_vocabulary()
        assert tokenizer.tokenize(text) == from_bytes.tokenize(text)


def test_config_round_trip(tokenizer):
    config = tokenizer.get_config()
    json.dumps(config)  # Must fit in a saved model's JSON config.
    restored = GemmaTokenizer.from_config(config)
    assert restored.proto == tokenizer.proto

    serialized = keras.saving.serialize_keras_object(tokenizer)
    assert serialized["registered_name"] == "keras_gemma>GemmaTokenizer"
    restored = keras.saving.deserialize_keras_object(json.loads(json.dumps(serialized)))
    assert isinstance(restored, GemmaTokenizer)
    assert restored.tokenize("hello 42") == tokenizer.tokenize("hello 42")


def test_training_is_deterministic():
    texts = ["the cat sat on the mat", "a dog sat on a log 123"] * 10
    assert train_sentencepiece(texts, 300) == train_sentencepiece(texts, 300)


def test_vocabulary_without_turn_markers():
    proto = train_raw_sentencepiece(
        vocab_size=30,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
    )
    tokenizer = GemmaTokenizer(proto)
    assert tokenizer.start_of_turn_id is None
    assert tokenizer.end_of_turn_id is None
    assert tokenizer.detokenize(tokenizer.tokenize("hello")) == "hello"


# Error cases.


def test_missing_file(tmp_path):
    path = tmp_path / "nope.spm"
    with pytest.raises(FileNotFoundError, match="nope.spm.*SentencePiece"):
        GemmaTokenizer(path)
    with pytest.raises(FileNotFoundError, match="directory"):
        GemmaTokenizer(str(tmp_path))


@pytest.mark.parametrize("proto", [b"", b"definitely not a model", b"\x00\x01"])
def test_invalid_proto_bytes(proto, tmp_path):
    with pytest.raises(ValueError, match="SentencePiece"):
        GemmaTokenizer(proto)
    path = tmp_path / "bad.spm"
    path.write_bytes(proto)
    with pytest.raises(ValueError, match="SentencePiece"):
        GemmaTokenizer(path)


@pytest.mark.parametrize("proto", [None, 123, ["vocabulary.spm"]])
def test_proto_of_wrong_type(proto):
    with pytest.raises(TypeError, match=type(proto).__name__):
        GemmaTokenizer(proto)


def test_vocabulary_missing_gemma_pieces():
    # SentencePiece's defaults: no <pad>, and <s>/</s> instead of <bos>/<eos>.
    with pytest.raises(ValueError, match="<pad>"):
        GemmaTokenizer(train_raw_sentencepiece(vocab_size=30))
    proto = train_raw_sentencepiece(vocab_size=30, pad_id=3, unk_id=0)
    with pytest.raises(ValueError, match="<eos>"):
        GemmaTokenizer(proto)


@pytest.mark.parametrize(
    "inputs, type_name",
    [(123, "int"), (None, "NoneType"), ([1, 2], "int"), (["ok", 4.5], "float")],
)
def test_tokenize_non_string(tokenizer, inputs, type_name):
    with pytest.raises(TypeError, match=type_name):
        tokenizer.tokenize(inputs)


def test_tokenize_2d_array(tokenizer):
    with pytest.raises(ValueError, match="1-D"):
        tokenizer.tokenize(np.array([["a", "b"]]))


@pytest.mark.parametrize("ids", [[10_000], [-1], [[5], [1, 10_000]]])
def test_detokenize_out_of_range(tokenizer, ids):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.detokenize(ids)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.detokenize(np.array(ids[-1]))


def test_detokenize_first_id_past_vocabulary(tokenizer):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.detokenize([5, tokenizer.vocabulary_size()])


@pytest.mark.parametrize("ids", [[1.0, 2.0], np.array([1.5]), ["a"]])
def test_detokenize_non_integer(tokenizer, ids):
    with pytest.raises(TypeError, match="integers"):
        tokenizer.detokenize(ids)


def test_detokenize_bad_shapes(tokenizer):
    with pytest.raises(ValueError, match="1-D or 2-D"):
        tokenizer.detokenize(np.zeros((1, 2, 3), dtype="int32"))
    with pytest.raises(ValueError, match="mixes"):
        tokenizer.detokenize([1, [2, 3]])


def test_id_and_token_lookup_errors(tokenizer):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.id_to_token(tokenizer.vocabulary_size())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.id_to_token(-1)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tokenizer.token_to_id("<no_such_piece>")


def test_training_errors():
    with pytest.raises(ValueError, match="Vocabulary size too high"):
        train_sentencepiece(["tiny corpus"], 5000)
    with pytest.raises(TypeError, match="bytes"):
        train_sentencepiece([b"not text"])
    with pytest.raises(ValueError, match="non-empty"):
        train_sentencepiece([])


# keras-hub's Gemma tokenizer (TensorFlow Text) as an oracle.


def _oracle_ids(outputs):
    if hasattr(outputs, "numpy"):  # tf.Tensor and torch.Tensor
        outputs = outputs.numpy()
    return np.asarray(outputs).tolist()


def _oracle_text(outputs):
    if hasattr(outputs, "numpy"):  # A scalar tf.Tensor of bytes.
        outputs = outputs.numpy()
    return outputs.decode("utf-8") if isinstance(outputs, bytes) else outputs


def test_matches_keras_hub(vocab_proto, tokenizer):
    pytest.importorskip("tensorflow_text")
    keras_hub = pytest.importorskip("keras_hub")
    oracle = keras_hub.models.GemmaTokenizer(proto=vocab_proto)

    assert oracle.get_vocabulary() == tokenizer.get_vocabulary()
    assert oracle.pad_token_id == tokenizer.pad_token_id
    assert oracle.start_token_id == tokenizer.start_token_id
    assert oracle.end_token_id == tokenizer.end_token_id
    for text in ROUND_TRIP_STRINGS:
        ids = tokenizer.tokenize(text)
        assert ids == _oracle_ids(oracle(text)), text
        assert tokenizer.detokenize(ids) == _oracle_text(oracle.detokenize(ids))
