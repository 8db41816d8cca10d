"""`load_dataset`: text for `fit` from local files, TFDS and Hugging Face.

Every source yields batches in one of the three forms
`GemmaCausalLMPreprocessor` takes: a list of strings (plain text),
`{"prompts": [...], "responses": [...]}` or `{"messages": [conversation, ...]}`.

Files are never read whole. Opening one indexes it once, keeping only where
each record starts (8 bytes a record for JSONL and CSV; Parquet's own row
group table); a batch then reads just its records. So `fit` can draw a new
random order every epoch over a file of any size (a `keras.utils.PyDataset`),
without a shuffle buffer. TFDS splits are `tf.data` pipelines and shuffle in
a buffer instead.
"""

import array
import copy
import csv
import glob
import importlib
import json
import math
import os

import keras
import numpy as np

_FILE_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
# Files are scanned in chunks this size (a few times it in NumPy temporaries).
_CHUNK_BYTES = 1 << 18
_EXTRA_HINT = 'pip install "keras-gemma[data]"'


def _optional_import(module, package):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"This source needs the `{package}` package, which is not installed. "
            f"Install it with `pip install {package}` or `{_EXTRA_HINT}`."
        ) from error


# The example forms: which fields make an example and how a batch looks.


class _Form:
    """Field names and the batch form they make: text, pairs or messages."""

    def __init__(self, kind, fields):
        self.kind = kind  # "text", "pairs" or "messages"
        self.fields = fields

    @classmethod
    def from_arguments(cls, text_field, prompt_field, response_field, messages_field):
        if (prompt_field is None) != (response_field is None):
            raise ValueError(
                "Pass `prompt_field` and `response_field` together (for "
                f"fine-tuning on pairs). Received prompt_field={prompt_field!r}, "
                f"response_field={response_field!r}."
            )
        given = [
            (kind, fields)
            for kind, fields in [
                ("text", (text_field,)),
                ("pairs", (prompt_field, response_field)),
                ("messages", (messages_field,)),
            ]
            if fields[0] is not None
        ]
        if len(given) > 1:
            raise ValueError(
                "Pass exactly one of `text_field`, `prompt_field`/`response_field` "
                "or `messages_field`: each makes a different kind of example."
            )
        return cls(*given[0]) if given else None

    @classmethod
    def infer(cls, present, where):
        """The form named by the conventional fields `present` in a record."""
        if "messages" in present:
            return cls("messages", ("messages",))
        if "prompt" in present and "response" in present:
            return cls("pairs", ("prompt", "response"))
        if "text" in present:
            return cls("text", ("text",))
        raise ValueError(
            f"{where} has no 'text', 'prompt'/'response' or 'messages' field, so "
            f"say which fields to use. Fields present: {sorted(present)}. For "
            'example load_dataset(..., prompt_field="instruction", '
            'response_field="response"), text_field="..." or messages_field="...".'
        )

    def check_present(self, present, where):
        missing = [f for f in self.fields if f not in present]
        if missing:
            raise ValueError(
                f"{where} has no field {', '.join(map(repr, missing))}. "
                f"Fields present: {sorted(present)}. Pass the right name with "
                "`text_field`, `prompt_field`/`response_field` or `messages_field`."
            )

    def example(self, record, where):
        """One record's validated values: a string, a pair, or a conversation."""
        self.check_present(record, where)
        if self.kind == "messages":
            return _conversation(record[self.fields[0]], self.fields[0], where)
        values = tuple(_string(record[f], f, where) for f in self.fields)
        return values[0] if self.kind == "text" else values

    def batch(self, examples):
        if self.kind == "text":
            return list(examples)
        if self.kind == "pairs":
            return {
                "prompts": [p for p, _ in examples],
                "responses": [r for _, r in examples],
            }
        return {"messages": list(examples)}


def _string(value, field, where):
    if not isinstance(value, str):
        raise TypeError(
            f"{where}: field {field!r} must be a string; it is "
            f"{type(value).__name__}: {value!r:.80}. Fix the record or map "
            "another field."
        )
    return value


def _conversation(value, field, where):
    if isinstance(value, str):
        # CSV cells can only hold text, so conversations arrive JSON-encoded.
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError(
            f"{where}: field {field!r} must be a non-empty list of "
            '{"role": ..., "content": ...} turns; it is '
            f"{type(value).__name__}: {value!r:.80}."
        )
    turns = []
    for i, turn in enumerate(value):
        if not (
            isinstance(turn, dict)
            and isinstance(turn.get("role"), str)
            and isinstance(turn.get("content"), str)
        ):
            raise TypeError(
                f"{where}: turn {i} of field {field!r} must be a dict with string "
                f"'role' and 'content'; it is {turn!r:.80}."
            )
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns


# Random-access sources: `len`, `read(indices) -> records` and `where(index)`.


def _line_number(path, offset):
    """1-based line number of byte `offset`: counted only when reporting errors."""
    count = 1
    with open(path, "rb") as f:
        while offset > 0:
            chunk = f.read(min(_CHUNK_BYTES, offset))
            if not chunk:
                break
            count += chunk.count(b"\n")
            offset -= len(chunk)
    return count


class _JsonlFile:
    """JSON Lines, indexed by the byte offset of every non-blank line."""

    def __init__(self, path):
        self.path = path
        self.offsets = self._starts(path)

    @staticmethod
    def _starts(path):
        """Byte offsets of the lines holding more than whitespace."""
        kept = []
        line_start = 0  # where the line being scanned began
        line_has_text = False  # ... and whether its bytes so far are more than spaces
        with open(path, "rb") as f:
            position = 0
            while chunk := f.read(_CHUNK_BYTES):
                chunk = np.frombuffer(chunk, np.uint8)
                newlines = np.flatnonzero(chunk == ord("\n"))
                text = (chunk != ord(" ")) & (chunk != ord("\t")) & (chunk != ord("\r"))
                text &= chunk != ord("\n")
                if len(newlines):
                    # Whether each line ending in this chunk has text, one
                    # reduction over the chunk (no per-byte counts).
                    begins = np.concatenate([[0], newlines[:-1] + 1])
                    has_text = np.logical_or.reduceat(text[: newlines[-1] + 1], begins)
                    has_text[0] |= line_has_text
                    begins[0] = line_start - position
                    kept.append(begins[has_text] + position)
                    line_start = position + int(newlines[-1]) + 1
                    line_has_text = bool(text[newlines[-1] + 1 :].any())
                else:
                    line_has_text |= bool(text.any())
                position += len(chunk)
        if line_has_text:  # a last line without "\n"
            kept.append(np.array([line_start], np.int64))
        return np.concatenate(kept).astype(np.int64) if kept else np.zeros(0, np.int64)

    def __len__(self):
        return len(self.offsets)

    def where(self, index):
        return f"{self.path!r}, line {_line_number(self.path, int(self.offsets[index]))}"

    def fields(self):
        return None  # only the records know them

    def read(self, indices):
        records = {}
        with open(self.path, "rb") as f:
            # Ascending offsets read the file front to back.
            for index in sorted(set(int(i) for i in indices)):
                f.seek(int(self.offsets[index]))
                line = f.readline()
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    raise ValueError(
                        f"{self.where(index)} is not valid JSON ({error}): {line[:80]!r}. "
                        "JSON Lines hold one JSON object per line, in UTF-8."
                    ) from None
                if not isinstance(record, dict):
                    raise ValueError(
                        f"{self.where(index)} must hold a JSON object with named "
                        f"fields; it holds {type(record).__name__}: {line[:80]!r}"
                    )
                records[index] = record
        return [records[int(i)] for i in indices]


class _Lines:
    """Decoded lines of a binary file, counting the bytes handed out.

    `csv.reader` pulls exactly the lines of one record, so `position` after
    a record is where the next one starts.
    """

    def __init__(self, f):
        self.f = f
        self.position = f.tell()

    def __iter__(self):
        return self

    def __next__(self):
        line = self.f.readline()
        if not line:
            raise StopIteration
        self.position += len(line)
        return line.decode("utf-8")


class _CsvFile:
    """CSV with a header row, indexed by the byte offset of every record."""

    def __init__(self, path):
        self.path = path
        self.offsets = array.array("q")
        with open(path, "rb") as f:
            lines = _Lines(f)
            reader = csv.reader(lines)
            header = next(reader, None)
            if not header:
                raise ValueError(
                    f"{path!r} has no header row: a CSV file's first row must name its fields."
                )
            header[0] = header[0].removeprefix("\ufeff")  # a UTF-8 byte order mark
            self.header = header
            start = lines.position
            try:
                for row in reader:
                    if row:  # blank lines hold no record
                        self.offsets.append(start)
                    start = lines.position
            except (csv.Error, UnicodeDecodeError) as error:
                raise ValueError(
                    f"{path!r}, line {_line_number(path, start)}: not readable as "
                    f"UTF-8 CSV ({error})."
                ) from None

    def __len__(self):
        return len(self.offsets)

    def where(self, index):
        return f"{self.path!r}, line {_line_number(self.path, self.offsets[index])}"

    def fields(self):
        return self.header

    def read(self, indices):
        records = {}
        with open(self.path, "rb") as f:
            for index in sorted(set(int(i) for i in indices)):
                f.seek(self.offsets[index])
                row = next(csv.reader(_Lines(f)))
                if len(row) != len(self.header):
                    raise ValueError(
                        f"{self.where(index)} has {len(row)} values but the header "
                        f"names {len(self.header)} fields {self.header}: {row!r:.80}"
                    )
                records[index] = dict(zip(self.header, row))
        return [records[int(i)] for i in indices]


class _ParquetFile:
    """Parquet, read a row group at a time (the smallest unit Parquet decodes)."""

    _CACHED_GROUPS = 2

    def __init__(self, path):
        pq = _optional_import("pyarrow.parquet", "pyarrow")
        self.path = path
        self._file = pq.ParquetFile(path)
        metadata = self._file.metadata
        counts = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
        self._group_starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._columns = None
        self._cache = {}  # row group -> pyarrow.Table of the used columns

    def __len__(self):
        return int(self._group_starts[-1])

    def where(self, index):
        return f"{self.path!r}, row {index} (counting from 0)"

    def fields(self):
        return self._file.schema_arrow.names

    def select(self, form):
        """Reads only `form`'s columns, after checking that they hold text."""
        import pyarrow as pa

        schema = self._file.schema_arrow
        for field in form.fields:
            kind = schema.field(field).type
            text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
            if form.kind == "messages":
                text = text or pa.types.is_list(kind) or pa.types.is_large_list(kind)
            if not text:
                raise TypeError(
                    f"{self.path!r}: column {field!r} holds {kind}, not "
                    f"{'conversations' if form.kind == 'messages' else 'strings'}. "
                    "Map another column or convert this one."
                )
        self._columns = list(form.fields)

    def order(self, rng):
        # Whole row groups in a random order, rows shuffled within each: a
        # batch then decodes one or two row groups, not one per record.
        starts = self._group_starts
        return np.concatenate(
            [
                starts[g] + rng.permutation(starts[g + 1] - starts[g])
                for g in rng.permutation(len(starts) - 1)
            ]
            or [np.zeros(0, np.int64)]
        )

    def _group(self, group):
        if group not in self._cache:
            if len(self._cache) >= self._CACHED_GROUPS:
                self._cache.pop(next(iter(self._cache)))
            self._cache[group] = self._file.read_row_group(group, columns=self._columns)
        return self._cache[group]

    def read(self, indices):
        indices = np.asarray(indices, np.int64)
        groups = np.searchsorted(self._group_starts, indices, side="right") - 1
        records = [None] * len(indices)
        for group in np.unique(groups):
            positions = np.flatnonzero(groups == group)
            rows = self._group(int(group)).take(indices[positions] - self._group_starts[group])
            for position, record in zip(positions, rows.to_pylist()):
                records[position] = record
        return records


class _HuggingFaceSplit:
    """A `datasets.Dataset`: Arrow files mapped into memory, read by row."""

    def __init__(self, dataset, name):
        self.dataset = dataset
        self.name = name

    def __len__(self):
        return len(self.dataset)

    def where(self, index):
        return f"{self.name}, row {index} (counting from 0)"

    def fields(self):
        return self.dataset.column_names

    def select(self, form):
        self.dataset = self.dataset.select_columns(list(form.fields))

    def read(self, indices):
        columns = self.dataset[[int(i) for i in indices]]
        return [dict(zip(columns, values)) for values in zip(*columns.values())]


class _Concatenation:
    """Several files read as one (e.g. shards)."""

    def __init__(self, parts):
        self.parts = parts
        self._starts = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self):
        return int(self._starts[-1])

    def _locate(self, index):
        part = int(np.searchsorted(self._starts, index, side="right")) - 1
        return part, int(index - self._starts[part])

    def where(self, index):
        part, local = self._locate(index)
        return self.parts[part].where(local)

    def order(self, rng):
        if not any(hasattr(part, "order") for part in self.parts):
            return rng.permutation(len(self))
        return np.concatenate(
            [self._starts[p] + _order(self.parts[p], rng) for p in rng.permutation(len(self.parts))]
        )

    def read(self, indices):
        records = [None] * len(indices)
        located = [self._locate(int(i)) for i in indices]
        for part in sorted({p for p, _ in located}):
            positions = [k for k, (p, _) in enumerate(located) if p == part]
            rows = self.parts[part].read([located[k][1] for k in positions])
            for position, record in zip(positions, rows):
                records[position] = record
        return records


def _order(source, rng):
    """A random order of `source`'s records that reads well from it."""
    return source.order(rng) if hasattr(source, "order") else rng.permutation(len(source))


class _TfdsSplit:
    """A prepared TFDS split, streamed through `tf.data`."""

    def __init__(self, tfds, builder, split, shuffle_buffer_size):
        self.tfds = tfds
        self.builder = builder
        self.split = split
        self.shuffle_buffer_size = shuffle_buffer_size
        self.name = f"TFDS {builder.name}/{split}"

    def __len__(self):
        try:
            return int(self.builder.info.splits[self.split].num_examples)
        except (KeyError, ValueError):
            raise TypeError(f"{self.name} does not record its number of examples.") from None

    def where(self, index):
        return self.name

    def as_dataset(self, shuffle=False, seed=None):
        return self.builder.as_dataset(
            split=self.split,
            shuffle_files=shuffle,
            read_config=self.tfds.ReadConfig(shuffle_seed=seed),
        )

    def batches(self, form, batch_size, shuffle, seed):
        fields = form.fields
        if form.kind == "text":
            select = lambda example: example[fields[0]]
        else:
            select = lambda example: {
                "prompts": example[fields[0]],
                "responses": example[fields[1]],
            }
        # Selecting first keeps only the used fields in the shuffle buffer.
        dataset = self.as_dataset(shuffle, seed).map(select)
        if shuffle:
            dataset = dataset.shuffle(self.shuffle_buffer_size, seed=seed)
        return dataset.batch(batch_size)


# The public pieces.


class TextDataset:
    """Examples from `load_dataset`; `fit` and `evaluate` take it directly.

    `GemmaCausalLM.fit(dataset, batch_size=..., epochs=...)` reads it batch by
    batch in a new random order each epoch (`shuffle=True`, `fit`'s default)
    and preprocesses each batch as it goes.

    Attributes:
        kind: `"text"`, `"pairs"` or `"messages"`: the batch form it makes.
        fields: the record fields read, e.g. `("instruction", "response")`.
        name: where the examples come from, for messages.
    """

    def __init__(self, source, form, name, seed=None):
        self.source = source
        self._form = form
        self.kind = form.kind
        self.fields = form.fields
        self.name = name
        self.seed = seed

    def __len__(self):
        return len(self.source)

    def __repr__(self):
        try:
            size = f"{len(self)} examples"
        except TypeError:
            size = "length unknown"
        return f"<TextDataset {self.name}: {self.kind} from fields {self.fields}, {size}>"

    def read(self, indices):
        """The records at `indices`, as one batch in the preprocessor's form."""
        if isinstance(self.source, _TfdsSplit):
            raise TypeError(f"{self.name} streams in order: use `batches()`.")
        records = self.source.read(indices)
        examples = [
            self._form.example(record, _Where(self.source, index))
            for index, record in zip(indices, records)
        ]
        return self._form.batch(examples)

    def batches(self, batch_size=32, shuffle=False, seed=None):
        """Raw batches of `batch_size` examples, in the preprocessor's form.

        Files and Hugging Face data give a `RawBatches` (a
        `keras.utils.PyDataset`; with `shuffle`, a new order every epoch);
        TFDS gives a `tf.data.Dataset` that shuffles in a buffer.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer. Received: {batch_size!r}")
        seed = self.seed if seed is None else seed
        if isinstance(self.source, _TfdsSplit):
            return self.source.batches(self._form, batch_size, shuffle, seed)
        return RawBatches(self, batch_size, shuffle=shuffle, seed=seed)


class _Where:
    """Formats a record's location only when an error needs it."""

    def __init__(self, source, index):
        self.source = source
        self.index = int(index)

    def __str__(self):
        return self.source.where(self.index)


class RawBatches(keras.utils.PyDataset):
    """Batches of a `TextDataset`, raw or through a preprocessor.

    Each batch reads only its own records from disk. With `shuffle`, the
    order is redrawn at the end of every epoch (and `fit(shuffle=True)` also
    shuffles the order of the batches). A packing preprocessor packs the
    examples of each batch into shared rows.
    """

    def __init__(self, dataset, batch_size, shuffle=False, seed=None):
        super().__init__()
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.preprocessor = None
        # Without a seed, follow NumPy's global state, which
        # `keras.utils.set_random_seed` sets: seeded runs see the same order.
        self._rng = np.random.default_rng(np.random.randint(2**31) if seed is None else seed)
        self._order = self._new_order()

    def _new_order(self):
        source = self.dataset.source
        return _order(source, self._rng) if self.shuffle else np.arange(len(source))

    def __len__(self):
        return math.ceil(len(self.dataset) / self.batch_size)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"Batch {index} is out of range: there are {len(self)} batches.")
        batch = self.dataset.read(
            self._order[index * self.batch_size : (index + 1) * self.batch_size]
        )
        return batch if self.preprocessor is None else self.preprocessor(batch)

    def on_epoch_end(self):
        if self.shuffle:
            self._order = self._new_order()

    def map(self, preprocessor):
        """The same batches passed through `preprocessor` (what `fit` trains on)."""
        mapped = copy.copy(self)
        mapped.preprocessor = preprocessor
        return mapped


def load_dataset(
    source,
    split=None,
    *,
    text_field=None,
    prompt_field=None,
    response_field=None,
    messages_field=None,
    format=None,
    data_dir=None,
    shuffle_buffer_size=10_000,
    seed=None,
    **hf_kwargs,
):
    """Reads training text from files, TFDS or Hugging Face for `fit`.

    Each record gives one example. Name its fields with `text_field` (plain
    text, for pretraining), `prompt_field` and `response_field` (fine-tuning:
    loss on the response only) or `messages_field` (a conversation: a list of
    `{"role", "content"}` turns). Without them the conventional names are
    used: `messages`, then `prompt`/`response`, then `text`.

    Sources:
    - A local file, a list of files or a glob pattern: JSON Lines
      (`.jsonl`, `.ndjson`, `.json`), CSV with a header row (`.csv`; a
      conversation cell holds JSON), Parquet (`.parquet`; needs `pyarrow`).
      `format="jsonl"|"csv"|"parquet"` overrides the extension.
    - `"tfds:NAME/SPLIT"`, e.g. `"tfds:gsm8k/train"`: a split prepared in
      `data_dir` by `tensorflow_datasets` (never downloaded here). With
      `split` given, the whole string after `tfds:` is the name (e.g.
      `"tfds:imdb_reviews/plain_text"`).
    - `"hf:NAME"` (e.g. `"hf:json"` with `data_files=...`), or a
      `datasets.Dataset`/`DatasetDict`: Hugging Face `datasets`. Extra keyword
      arguments go to `datasets.load_dataset`.

    Files are not read whole: opening one keeps where each record starts,
    and each batch reads only its records, so shuffling stays exact over any
    file size. Parquet shuffles whole row groups and the rows within each
    (a batch decodes one or two row groups); TFDS shuffles in a buffer of
    `shuffle_buffer_size` examples.

    Args:
        source: a path, list of paths, glob, `"tfds:..."`, `"hf:..."` or a
            Hugging Face dataset.
        split: the TFDS or Hugging Face split.
        text_field: the field holding plain text.
        prompt_field: the field holding prompts (with `response_field`).
        response_field: the field holding responses.
        messages_field: the field holding conversations.
        format: the file format, when the extension does not say it.
        data_dir: where TFDS looks for prepared datasets.
        shuffle_buffer_size: examples TFDS shuffles among.
        seed: the shuffling seed; `None` follows NumPy's global random
            state (and TensorFlow's for TFDS), which
            `keras.utils.set_random_seed` sets.

    Returns:
        A `TextDataset` that `GemmaCausalLM.fit`/`evaluate` take; its
        `batches(batch_size)` gives the raw batches.

    Example:
    >>> import json, os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "dolly.jsonl")
    >>> with open(path, "w") as f:
    ...     for q, a in [("Name a colour.", "Blue."), ("What is 2+2?", "4")]:
    ...         _ = f.write(json.dumps({"instruction": q, "response": a}) + "\\n")
    >>> data = load_dataset(path, prompt_field="instruction", response_field="response")
    >>> len(data), data.kind
    (2, 'pairs')
    >>> data.batches(batch_size=2)[0]
    {'prompts': ['Name a colour.', 'What is 2+2?'], 'responses': ['Blue.', '4']}

    Then `lm.fit(data, batch_size=2, epochs=3)` trains on it.
    """
    form = _Form.from_arguments(text_field, prompt_field, response_field, messages_field)
    if isinstance(source, str) and source.startswith("tfds:"):
        _no_extra_arguments(hf_kwargs, "TFDS")
        return _load_tfds(source[5:], split, data_dir, form, shuffle_buffer_size, seed)
    if isinstance(source, str) and source.startswith("hf:"):
        datasets = _optional_import("datasets", "datasets")
        loaded = datasets.load_dataset(source[3:], split=split, **hf_kwargs)
        return _from_huggingface(loaded, source, None, form, seed)
    if type(source).__module__.split(".")[0] == "datasets":
        _no_extra_arguments(hf_kwargs, "A Hugging Face dataset object")
        return _from_huggingface(source, "Hugging Face dataset", split, form, seed)
    _no_extra_arguments(hf_kwargs, "A file")
    if split is not None:
        raise ValueError(
            "`split` selects a TFDS or Hugging Face split; a file is one split. "
            "Load each split's file separately."
        )
    paths = _expand_paths(source)
    parts = [_open_file(path, format) for path in paths]
    source_ = parts[0] if len(parts) == 1 else _Concatenation(parts)
    name = repr(paths[0]) if len(paths) == 1 else f"{len(paths)} files ({paths[0]!r}, ...)"
    for part, path in zip(parts, paths):
        form = _check_source(part, form, repr(path))
    return TextDataset(source_, form, name, seed)


def _no_extra_arguments(kwargs, what):
    if kwargs:
        raise TypeError(
            f"{what} takes no extra arguments {sorted(kwargs)}; they are passed "
            'to Hugging Face `datasets.load_dataset` only, for sources "hf:NAME".'
        )


def _expand_paths(source):
    items = list(source) if isinstance(source, (list, tuple)) else [source]
    if not items:
        raise ValueError("`source` is an empty list: give at least one file.")
    paths = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(
                "`source` must be a file path, a list of paths, a glob, "
                '"tfds:NAME/SPLIT", "hf:NAME" or a Hugging Face dataset. '
                f"Received: {type(item).__name__}"
            )
        item = os.fspath(item)
        if glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise FileNotFoundError(f"No file matches the pattern {item!r}.")
            paths.extend(matches)
        else:
            paths.append(item)
    return paths


def _open_file(path, format):
    if not os.path.isfile(path):
        where = os.path.abspath(path)
        raise FileNotFoundError(
            f"No such file: {path!r} (looked at {where!r}). For TFDS or Hugging "
            'Face data, prefix the name: "tfds:NAME/SPLIT" or "hf:NAME".'
        )
    extension = os.path.splitext(path)[1].lower()
    format = format or _FILE_FORMATS.get(extension)
    readers = {"jsonl": _JsonlFile, "csv": _CsvFile, "parquet": _ParquetFile}
    if format not in readers:
        raise ValueError(
            f"Cannot tell the format of {path!r} from its extension {extension!r}. "
            f"Known extensions: {sorted(_FILE_FORMATS)}; or pass "
            'format="jsonl", "csv" or "parquet".'
        )
    return readers[format](path)


def _check_source(source, form, name):
    """Infers the form if needed and checks it on the first record."""
    if len(source) == 0:
        raise ValueError(f"{name} holds no records.")
    fields = source.fields()
    first = None
    if fields is None:
        first = source.read([0])[0]
        fields = list(first)
        name = _Where(source, 0)
    if form is None:
        form = _Form.infer(fields, name)
    form.check_present(fields, name)
    if hasattr(source, "select"):
        source.select(form)
    # One record now catches a wrong mapping before training starts; the
    # others are checked as batches read them.
    form.example(first or source.read([0])[0], _Where(source, 0))
    return form


def _from_huggingface(loaded, name, split, form, seed):
    datasets = _optional_import("datasets", "datasets")
    if isinstance(loaded, dict):  # a DatasetDict: split name -> Dataset
        splits = list(loaded.keys())
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in splits:
            raise ValueError(f"{name} has splits {splits}: pick one with `split=`.")
        loaded, name = loaded[split], f"{name}[{split!r}]"
    elif split is not None:
        raise ValueError(f"{name} is a single split already; drop `split={split!r}`.")
    if not isinstance(loaded, datasets.Dataset):
        raise TypeError(
            f"{name} is a {type(loaded).__name__}; load_dataset reads map-style "
            "`datasets.Dataset`s (memory-mapped, so large ones need not fit in "
            "memory). Load without `streaming=True`."
        )
    source = _HuggingFaceSplit(loaded, name)
    form = _check_source(source, form, name)
    return TextDataset(source, form, name, seed)


def _load_tfds(name, split, data_dir, form, shuffle_buffer_size, seed):
    tfds = _optional_import("tensorflow_datasets", "tensorflow-datasets")
    if split is None:
        if "/" not in name:
            raise ValueError(f"Name the TFDS split: 'tfds:{name}/train' (or pass split=...).")
        name, split = name.rsplit("/", 1)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"TFDS has no dataset named {name!r} (`tfds.list_builders()` lists them)."
        ) from None
    root = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    try:
        source = _TfdsSplit(tfds, builder, split, shuffle_buffer_size)
        spec = source.as_dataset().element_spec
    except AssertionError:  # how TFDS says the data is not there
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in data_dir={root!r} (looked "
            f"for {builder.data_dir!r}), and it is never downloaded here. On a "
            f"machine with internet run `tfds build {name} --data_dir=DIR`, copy "
            f"DIR/{name.split('/')[0]} into {root!r}, and pass data_dir={root!r}."
        ) from None
    except ValueError as error:
        raise ValueError(f"TFDS {name!r}, split {split!r}: {error}") from None
    what = f"TFDS {name}/{split}"
    if form is None:
        form = _Form.infer(spec, what)
    if form.kind == "messages":
        raise ValueError(
            f"{what}: `messages_field` works on files and Hugging Face data; TFDS "
            "features cannot hold conversations of varying length as strings. "
            "Map `prompt_field`/`response_field` or `text_field` instead."
        )
    form.check_present(spec, what)
    for field in form.fields:
        tensor = spec[field]
        if getattr(tensor, "dtype", None) != "string" or tensor.shape.rank != 0:
            raise TypeError(
                f"{what}: feature {field!r} must hold one string per example; it is "
                f"{tensor}. Map a text feature."
            )
    return TextDataset(source, form, what, seed)
