"""`load_dataset`: files, TFDS and Hugging Face read back what was written, stream, and train."""

import csv
import json
import sys
import tempfile
import tracemalloc
from unittest import mock

import keras
import numpy as np
import pytest
from conftest import make_backbone
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_gemma import GemmaCausalLM
from keras_gemma import GemmaCausalLMPreprocessor
from keras_gemma import datasets as datasets_module
from keras_gemma import load_dataset
from keras_gemma.datasets import RawBatches
from keras_gemma.datasets import TextDataset

# Any text a JSON or CSV file can hold (CSV cannot hold NUL).
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)


def _pairs(n, seed=0):
    """Arithmetic questions the test tokenizer covers, with their answers."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(1, 50, (2, n))
    return {
        "prompts": [f"What is {x} plus {y}?" for x, y in zip(a, b)],
        "responses": [f"{x} plus {y} is {x + y}." for x, y in zip(a, b)],
    }


def _write_jsonl(path, records, **dumps):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, **dumps) + "\n")
    return path


def _dolly(path, data):
    """The keras.io Dolly layout: `instruction`, `context`, `response`."""
    records = [
        {"instruction": p, "context": "", "response": r, "category": "qa"}
        for p, r in zip(data["prompts"], data["responses"])
    ]
    return _write_jsonl(path, records)


def _all(batches):
    """Every example of a `RawBatches` epoch, in order, as one batch."""
    out = None
    for i in range(len(batches)):
        batch = batches[i]
        if out is None:
            out = batch
        elif isinstance(batch, dict):
            out = {key: out[key] + batch[key] for key in out}
        else:
            out = out + batch
    return out


# Files read back exactly what was written.


@settings(max_examples=25, deadline=None)
@given(
    texts=st.lists(TEXT.filter(str.strip), min_size=1, max_size=12),
    ascii=st.booleans(),
    chunk_bytes=st.sampled_from([1, 3, 7, 64, 1 << 18]),
)
def test_jsonl_reads_back_any_text(texts, ascii, chunk_bytes):
    with tempfile.TemporaryDirectory() as directory:
        path = f"{directory}/texts.jsonl"
        with open(path, "w", encoding="utf-8", newline="") as f:
            for i, text in enumerate(texts):
                # Blank lines, whitespace-only lines and CRLF endings are not records.
                f.write(["", "\n", "  \r\n"][i % 3])
                f.write(json.dumps({"text": text}, ensure_ascii=ascii))
                f.write("\r\n" if i % 2 else "\n")
        # Small scanning chunks put line ends on every side of a boundary.
        with mock.patch.object(datasets_module, "_CHUNK_BYTES", chunk_bytes):
            data = load_dataset(path, text_field="text")
        assert len(data) == len(texts)
        assert _all(data.batches(batch_size=5)) == texts


@settings(max_examples=25, deadline=None)
@given(rows=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=12))
def test_csv_reads_back_any_text(rows):
    with tempfile.TemporaryDirectory() as directory:
        path = f"{directory}/pairs.csv"
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "instruction", "response"])
            writer.writerows([i, p, r] for i, (p, r) in enumerate(rows))
        data = load_dataset(path, prompt_field="instruction", response_field="response")
        assert len(data) == len(rows)
        assert _all(data.batches(batch_size=4)) == {
            "prompts": [p for p, _ in rows],
            "responses": [r for _, r in rows],
        }


def test_dolly_layout_maps_fields(tmp_path):
    data = _pairs(7)
    loaded = load_dataset(
        _dolly(tmp_path / "dolly.jsonl", data),
        prompt_field="instruction",
        response_field="response",
    )
    assert (loaded.kind, loaded.fields) == ("pairs", ("instruction", "response"))
    assert _all(loaded.batches(3)) == data
    # The same records with the text mapped from another field.
    assert (
        _all(load_dataset(tmp_path / "dolly.jsonl", text_field="response").batches(3))
        == (data["responses"])
    )


def test_conventional_field_names_need_no_arguments(tmp_path):
    data = _pairs(3)
    rows = [{"prompt": p, "response": r} for p, r in zip(*data.values())]
    assert _all(load_dataset(_write_jsonl(tmp_path / "a.jsonl", rows)).batches(3)) == data
    texts = [{"text": "one", "meta": 1}, {"text": "two", "meta": 2}]
    assert load_dataset(_write_jsonl(tmp_path / "b.jsonl", texts)).batches(2)[0] == ["one", "two"]


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "model", "content": "Hello."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"},
    ],
]


def test_conversations_from_jsonl_csv_and_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    expected = {"messages": CONVERSATIONS}
    jsonl = _write_jsonl(tmp_path / "chat.jsonl", [{"turns": c, "id": 0} for c in CONVERSATIONS])
    assert load_dataset(jsonl, messages_field="turns").batches(2)[0] == expected
    # Extra keys in a turn are dropped; the conventional name needs no argument.
    extra = [[dict(turn, name="x") for turn in c] for c in CONVERSATIONS]
    extra = _write_jsonl(tmp_path / "extra.jsonl", [{"messages": c} for c in extra])
    assert load_dataset(extra).batches(2)[0] == expected
    with open(tmp_path / "chat.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["messages"])
        writer.writerows([json.dumps(c)] for c in CONVERSATIONS)
    assert load_dataset(tmp_path / "chat.csv").batches(2)[0] == expected
    pq.write_table(pa.table({"messages": CONVERSATIONS}), tmp_path / "chat.parquet")
    assert load_dataset(tmp_path / "chat.parquet").batches(2)[0] == expected


def test_parquet_reads_back_and_shuffles_by_row_group(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    texts = [f"row {i}" for i in range(50)]
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"n": np.arange(50), "text": texts}), path, row_group_size=8)
    data = load_dataset(path, text_field="text")
    assert len(data) == 50 and _all(data.batches(7)) == texts
    batches = data.batches(8, shuffle=True, seed=0)
    orders = []
    for _ in range(2):
        epoch = [batches[i] for i in range(len(batches))]
        assert sorted(sum(epoch, [])) == sorted(texts)  # every row once an epoch
        # A batch spans at most two row groups: one decode each, not one per row.
        assert all(len({int(t.split()[1]) // 8 for t in batch}) <= 2 for batch in epoch)
        orders.append(sum(epoch, []))
        batches.on_epoch_end()
    assert orders[0] != orders[1] and orders[0] != texts


def test_shuffled_epochs_cover_every_record_in_a_new_order(tmp_path):
    texts = [f"line {i}" for i in range(40)]
    path = _write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    batches = load_dataset(path, seed=3).batches(6, shuffle=True)
    assert isinstance(batches, RawBatches) and len(batches) == 7
    first = _all(batches)
    batches.on_epoch_end()
    second = _all(batches)
    assert sorted(first) == sorted(second) == sorted(texts)
    assert first != second and first != texts
    # The same seed gives the same order.
    assert _all(load_dataset(path, seed=3).batches(6, shuffle=True)) == first


def test_several_files_and_globs_read_as_one(tmp_path):
    for shard in range(3):
        _write_jsonl(
            tmp_path / f"shard-{shard}.jsonl", [{"text": f"{shard}-{i}"} for i in range(4)]
        )
    expected = [f"{s}-{i}" for s in range(3) for i in range(4)]
    assert _all(load_dataset(str(tmp_path / "shard-*.jsonl")).batches(5)) == expected
    listed = load_dataset([tmp_path / "shard-2.jsonl", tmp_path / "shard-0.jsonl"])
    assert _all(listed.batches(3)) == expected[8:] + expected[:4]
    shuffled = _all(load_dataset(str(tmp_path / "*.jsonl")).batches(5, shuffle=True, seed=1))
    assert sorted(shuffled) == sorted(expected) and shuffled != expected


# Large files stream: memory stays far below the file's size.


@pytest.mark.parametrize("extension", ["jsonl", "csv"])
def test_large_file_streams(tmp_path, extension):
    record = "lorem ipsum dolor sit amet " * 40  # ~1 kB a record
    n = 24_000
    path = tmp_path / f"big.{extension}"
    with open(path, "w", newline="") as f:
        if extension == "csv":
            f.write("text\n")
        for i in range(n):
            if extension == "jsonl":
                f.write(json.dumps({"text": f"{i} {record}"}) + "\n")
            else:
                f.write(f'"{i} {record}"\n')
    size = path.stat().st_size
    assert size > 24e6
    tracemalloc.start()
    try:
        data = load_dataset(path, text_field="text")
        batches = data.batches(32, shuffle=True, seed=0)
        reads = [batches[i] for i in (0, len(batches) // 2, len(batches) - 1)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(data) == n
    # An index of offsets, one scanning chunk and a few batches: about 1 MB.
    assert peak < size / 10, (peak, size)
    assert all(text.split()[1:] == record.split() for batch in reads for text in batch)
    assert len({int(text.split()[0]) for batch in reads for text in batch}) == 96


# Hugging Face `datasets`, offline.


def test_hugging_face_sources(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = _pairs(5)
    path = _dolly(tmp_path / "dolly.jsonl", data)
    loaded = load_dataset(
        "hf:json",
        data_files=str(path),
        cache_dir=str(tmp_path / "cache"),
        prompt_field="instruction",
        response_field="response",
    )
    assert len(loaded) == 5 and _all(loaded.batches(2)) == data
    texts = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "n": [1, 2, 3]})
    assert _all(load_dataset(texts).batches(2)) == ["a", "b", "c"]
    splits = datasets.DatasetDict({"train": texts, "test": texts.select([2])})
    assert _all(load_dataset(splits, split="test").batches(2)) == ["c"]
    with pytest.raises(ValueError, match=r"splits \['train', 'test'\]: pick one with `split=`"):
        load_dataset(splits)
    with pytest.raises(TypeError, match="Load without `streaming=True`"):
        load_dataset(texts.to_iterable_dataset())
    bad = datasets.Dataset.from_dict({"text": ["a", None]})
    with pytest.raises(TypeError, match=r"row 1 \(counting from 0\): field 'text' must be a str"):
        load_dataset(bad).batches(2)[0]


# TFDS: a dataset prepared locally, and `tfds.testing.mock_data`.


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A data_dir holding `tiny_arithmetic`, prepared here from `_pairs(10)`."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyArithmetic(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            text = tfds.features.Text()
            features = {"question": text, "answer": text, "id": np.int32}
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(_pairs(10))}

        def _generate_examples(self, data):
            for i, (p, r) in enumerate(zip(data["prompts"], data["responses"])):
                yield i, {"question": p, "answer": r, "id": i}

    directory = str(tmp_path_factory.mktemp("tfds"))
    TinyArithmetic(data_dir=directory).download_and_prepare()
    return directory


def _decoded(batch):
    if isinstance(batch, dict):
        return {key: [s.decode() for s in value.numpy()] for key, value in batch.items()}
    return [s.decode() for s in batch.numpy()]


def test_tfds_reads_a_locally_prepared_split(tfds_dir):
    data = load_dataset(
        "tfds:tiny_arithmetic/train",
        data_dir=tfds_dir,
        prompt_field="question",
        response_field="answer",
    )
    assert len(data) == 10 and data.kind == "pairs"
    read = [_decoded(b) for b in data.batches(4)]
    assert [len(b["prompts"]) for b in read] == [4, 4, 2]
    pairs = {(p, r) for b in read for p, r in zip(b["prompts"], b["responses"])}
    assert pairs == set(zip(*_pairs(10).values()))
    answers = load_dataset(
        "tfds:tiny_arithmetic", split="train[:3]", data_dir=tfds_dir, text_field="answer"
    )
    assert len(_decoded(next(iter(answers.batches(8))))) == 3


def test_tfds_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        data = load_dataset(
            "tfds:gsm8k/train",
            data_dir=str(tmp_path),
            prompt_field="question",
            response_field="answer",
        )
        reference = tfds.load("gsm8k", split="train", data_dir=str(tmp_path))
        expected = [(e["question"].numpy(), e["answer"].numpy()) for e in reference]
        read = [
            pair
            for batch in data.batches(4)
            for pair in zip(batch["prompts"].numpy(), batch["responses"].numpy())
        ]
    assert read == expected and len(read) == 6


# `fit` and `evaluate` take what `load_dataset` returns.


def _lm(tokenizer):
    lm = GemmaCausalLM(make_backbone("mqa", seed=0), GemmaCausalLMPreprocessor(tokenizer, 24))
    lm.compile(optimizer=keras.optimizers.Adam(5e-3))
    return lm


def test_multi_epoch_fit_on_a_file_lowers_the_loss(tokenizer, tmp_path):
    data = _pairs(16)
    path = _dolly(tmp_path / "dolly.jsonl", data)
    loaded = load_dataset(path, prompt_field="instruction", response_field="response", seed=0)
    lm = _lm(tokenizer)
    # The same numbers as the in-memory examples: the file holds the same batches.
    before = lm.evaluate(loaded, batch_size=8, verbose=0, return_dict=True)["loss"]
    in_memory = lm.evaluate(data, batch_size=8, verbose=0, return_dict=True)["loss"]
    np.testing.assert_allclose(before, in_memory, rtol=1e-6)
    lm.fit(loaded, batch_size=8, epochs=8, verbose=0)
    after = lm.evaluate(loaded, batch_size=8, verbose=0, return_dict=True)["loss"]
    assert after < 0.7 * before, (before, after)


def test_validation_data_from_a_file(tokenizer, tmp_path):
    loaded = load_dataset(
        _dolly(tmp_path / "dolly.jsonl", _pairs(8)),
        prompt_field="instruction",
        response_field="response",
    )
    history = _lm(tokenizer).fit(loaded, batch_size=4, epochs=3, verbose=0, validation_data=loaded)
    assert history.history["val_loss"][-1] < history.history["val_loss"][0]


def test_fit_on_text_and_conversations_from_files(tokenizer, tmp_path):
    # One batch shape throughout (4 rows), so JAX compiles each step once.
    texts = [f"{p} {r}" for p, r in zip(*_pairs(8).values())]
    path = _write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    lm = _lm(tokenizer)
    history = lm.fit(load_dataset(path), batch_size=4, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["loss"]).all()
    in_memory = lm.evaluate(texts, batch_size=4, verbose=0)
    loaded = lm.evaluate(load_dataset(path), batch_size=4, verbose=0)
    np.testing.assert_allclose(loaded, in_memory, rtol=1e-6)
    chat = _write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in CONVERSATIONS * 2])
    history = lm.fit(load_dataset(chat), batch_size=4, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    in_memory = lm.evaluate({"messages": CONVERSATIONS * 2}, batch_size=4, verbose=0)
    loaded = lm.evaluate(load_dataset(chat), batch_size=4, verbose=0)
    np.testing.assert_allclose(loaded, in_memory, rtol=1e-6)


def test_fit_with_a_packing_preprocessor_packs_each_batch(tokenizer, tmp_path):
    path = _dolly(tmp_path / "dolly.jsonl", _pairs(12))
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, 128, packing=True)
    batch = (
        load_dataset(path, prompt_field="instruction", response_field="response")
        .batches(6)
        .map(preprocessor)[0]
    )
    assert len(batch[1]) < 6  # six short examples share fewer rows
    lm = GemmaCausalLM(make_backbone("mqa", seed=0), preprocessor)
    history = lm.fit(
        load_dataset(path, prompt_field="instruction", response_field="response"),
        batch_size=6,
        verbose=0,
    )
    assert np.isfinite(history.history["loss"][0])


def test_unseeded_order_follows_keras_set_random_seed(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"text": str(i)} for i in range(20)])
    orders = []
    for _ in range(2):
        keras.utils.set_random_seed(7)
        orders.append(_all(load_dataset(path).batches(5, shuffle=True)))
    assert orders[0] == orders[1] and sorted(orders[0]) == sorted(map(str, range(20)))


def test_fit_on_tfds(tokenizer, tfds_dir):
    data = load_dataset(
        "tfds:tiny_arithmetic/train",
        data_dir=tfds_dir,
        prompt_field="question",
        response_field="answer",
    )
    lm = _lm(tokenizer)
    history = lm.fit(data, batch_size=5, epochs=3, verbose=0)
    assert len(history.history["loss"]) == 3 and np.isfinite(history.history["loss"]).all()
    # Whole-split loss: the same as the examples in memory, in any order.
    loss = lm.evaluate(data, batch_size=10, verbose=0)
    np.testing.assert_allclose(loss, lm.evaluate(_pairs(10), batch_size=10, verbose=0), rtol=1e-5)


def test_fit_checks_still_apply(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"text": "The fox."}])
    with pytest.raises(ValueError, match="no preprocessor"):
        GemmaCausalLM(make_backbone("mqa")).fit(load_dataset(path), verbose=0)
    with pytest.raises(ValueError, match="do not pass `y`"):
        _lm(tokenizer).fit(load_dataset(path), np.zeros((1, 24)), verbose=0)


# Bad input: errors that name the place and the fix.


def test_missing_field_names_file_line_and_fields_present(tmp_path):
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [{"instruction": "a", "response": "b"}, {"instruction": "c", "output": "d"}],
    )
    data = load_dataset(path, prompt_field="instruction", response_field="response")
    message = (
        rf"'{path}', line 2 has no field 'response'. Fields present: \['instruction', 'output'\]"
    )
    with pytest.raises(ValueError, match=message):
        data.batches(2)[0]
    # The first record is checked when loading, before any training.
    with pytest.raises(ValueError, match=r"line 1 has no field 'prompt'.*`prompt_field`"):
        load_dataset(path, prompt_field="prompt", response_field="response")
    with pytest.raises(ValueError, match=r"no 'text', 'prompt'/'response' or 'messages' field"):
        load_dataset(path)
    with open(tmp_path / "d.csv", "w") as f:
        f.write("question,answer\nq,a\n")
    with pytest.raises(ValueError, match=r"'.*d.csv' has no field 'text'. Fields present: \['ans"):
        load_dataset(tmp_path / "d.csv", text_field="text")


def test_bad_values_name_the_record(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, {"text": 42}])
    with pytest.raises(TypeError, match=r"line 2: field 'text' must be a string; it is int: 42"):
        load_dataset(path).batches(2)[0]
    with open(tmp_path / "broken.jsonl", "w") as f:
        f.write('{"text": "a"}\n\n{"text": \n["a list"]\n')
    broken = load_dataset(tmp_path / "broken.jsonl")
    with pytest.raises(ValueError, match=r"broken.jsonl', line 3 is not valid JSON"):
        broken.read([1])
    with pytest.raises(ValueError, match=r"line 4 must hold a JSON object.*it holds list"):
        broken.read([2])
    turns = [CONVERSATIONS[0], [], [{"role": "user"}]]
    chat = load_dataset(_write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in turns]))
    with pytest.raises(TypeError, match=r"line 2: field 'messages' must be a non-empty list"):
        chat.read([1])
    with pytest.raises(TypeError, match=r"line 3: turn 0 of field 'messages' must be a dict"):
        chat.read([2])
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1.jsonl', line 2 is not valid JSON.*in UTF-8"):
        load_dataset(tmp_path / "latin1.jsonl").read([1])
    (tmp_path / "latin1.csv").write_bytes(b"text\na\n\ncaf\xe9\n")
    with pytest.raises(ValueError, match=r"latin1.csv', line 4: not readable as UTF-8 CSV"):
        load_dataset(tmp_path / "latin1.csv")
    with open(tmp_path / "short.csv", "w") as f:
        f.write("prompt,response\na,b\nc\n")
    with pytest.raises(ValueError, match=r"short.csv', line 3 has 1 values but the header names 2"):
        load_dataset(tmp_path / "short.csv").read([1])


def test_parquet_column_types_are_checked_on_load(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": ["a", None], "n": [1, 2]}), tmp_path / "p.parquet")
    with pytest.raises(TypeError, match=r"column 'n' holds int64, not strings"):
        load_dataset(tmp_path / "p.parquet", text_field="n")
    with pytest.raises(TypeError, match=r"p.parquet', row 1 \(counting from 0\): field 'text'"):
        load_dataset(tmp_path / "p.parquet").read([1])


def test_files_that_cannot_be_read(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"No such file: '.*missing.jsonl'.*tfds:NAME/SPLIT"
    ):
        load_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "notes.txt").write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match=r"extension '.txt'.*format=\"jsonl\", \"csv\" or \"parq"):
        load_dataset(tmp_path / "notes.txt")
    assert load_dataset(tmp_path / "notes.txt", format="jsonl").read([0]) == ["a"]
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty.jsonl' holds no records"):
        load_dataset(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="No file matches the pattern"):
        load_dataset(str(tmp_path / "none-*.jsonl"))


def test_argument_mistakes(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(ValueError, match="Pass `prompt_field` and `response_field` together"):
        load_dataset(path, prompt_field="prompt")
    with pytest.raises(ValueError, match="Pass exactly one of"):
        load_dataset(path, text_field="prompt", messages_field="response")
    with pytest.raises(TypeError, match=r"takes no extra arguments \['data_files'\]"):
        load_dataset(path, data_files="x")
    with pytest.raises(ValueError, match="a file is one split"):
        load_dataset(path, split="train")
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        load_dataset(path).batches(0)


def test_tfds_that_is_not_prepared_says_how_to_prepare_it(tmp_path, tfds_dir):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("tfds:gsm8k/train", data_dir=str(tmp_path), text_field="question")
    message = str(error.value)
    assert f"not prepared in data_dir='{tmp_path}'" in message
    assert f"{tmp_path}/gsm8k/" in message  # the versioned folder it looked for
    assert "tfds build gsm8k --data_dir=DIR" in message
    with pytest.raises(ValueError, match="TFDS has no dataset named 'no_such_set'"):
        load_dataset("tfds:no_such_set/train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"split 'validation'.*Unknown split"):
        load_dataset("tfds:tiny_arithmetic/validation", data_dir=tfds_dir)
    with pytest.raises(ValueError, match=r"has no field 'text'. Fields present: \['answer', 'id'"):
        load_dataset("tfds:tiny_arithmetic/train", data_dir=tfds_dir, text_field="text")
    with pytest.raises(TypeError, match="feature 'id' must hold one string per example"):
        load_dataset("tfds:tiny_arithmetic/train", data_dir=tfds_dir, text_field="id")


@pytest.mark.parametrize(
    "module, package, source",
    [
        ("tensorflow_datasets", "tensorflow-datasets", "tfds:gsm8k/train"),
        ("pyarrow.parquet", "pyarrow", "data.parquet"),
        ("datasets", "datasets", "hf:json"),
    ],
)
def test_missing_optional_packages_name_the_extra(tmp_path, monkeypatch, module, package, source):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    if source.endswith(".parquet"):
        (tmp_path / source).write_bytes(b"PAR1")
        source = str(tmp_path / source)
    with pytest.raises(ImportError, match=rf"needs the `{package}` package.*keras-gemma\[data\]"):
        load_dataset(source)


def test_text_dataset_is_what_load_dataset_returns(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    data = load_dataset(path)
    assert isinstance(data, TextDataset)
    assert repr(data) == f"<TextDataset '{path}': text from fields ('text',), 1 examples>"
