"""Feeding raw text to `fit`/`evaluate` through the preprocessor."""

import math

import keras
import numpy as np

from keras_gemma.datasets import RawBatches
from keras_gemma.datasets import TextDataset

_DEFAULT_BATCH_SIZE = 32


def _is_raw_text(x):
    if isinstance(x, dict):
        return bool({"prompts", "responses", "messages"} & set(x))
    if isinstance(x, (str, bytes)):
        return True
    if isinstance(x, np.ndarray):
        return x.dtype.kind in "USO"
    if isinstance(x, (list, tuple)):
        return len(x) > 0 and isinstance(x[0], (str, bytes))
    return False


def _is_tf_dataset(x):
    return type(x).__module__.startswith("tensorflow") and hasattr(x, "element_spec")


def _example_count(data):
    """The number of examples in raw training data, checked for agreement."""
    if not isinstance(data, dict):
        return len(data)
    sizes = {key: len(value) for key, value in data.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"Every field of the training data must have one entry per example; got sizes "
            f"{sizes}. Give as many responses as prompts."
        )
    return next(iter(sizes.values()))


class PreprocessedBatches(keras.utils.PyDataset):
    """Preprocesses raw text one batch at a time, reshuffled every epoch.

    With a packing preprocessor, every example is tokenized up front and
    packed into shared rows once; the rows are batched and reshuffled.

    Example:
    >>> from keras_gemma import GemmaCausalLMPreprocessor, GemmaTokenizer
    >>> from keras_gemma.tokenizer import train_sentencepiece
    >>> tokenizer = GemmaTokenizer(train_sentencepiece(["a b c"] * 50, 268))
    >>> batches = PreprocessedBatches(["a b", "c"], GemmaCausalLMPreprocessor(
    ...     tokenizer, sequence_length=4), batch_size=2)
    >>> len(batches)
    1
    """

    def __init__(self, data, preprocessor, batch_size, shuffle=False, seed=None):
        super().__init__()
        if isinstance(data, (str, bytes)):
            data = [data]
        self.data = data
        self.preprocessor = preprocessor
        self.batch_size = batch_size
        self.shuffle = shuffle
        self._size = _example_count(data)
        if self._size == 0:
            raise ValueError("The training data is empty: pass at least one example.")
        self._packed = None
        if getattr(preprocessor, "packing", False):
            self._packed = preprocessor.pack(preprocessor.tokenize_examples(data))
            self._size = len(self._packed[1])
        self._order = np.arange(self._size)
        # Without a seed, follow NumPy's global state, which
        # `keras.utils.set_random_seed` sets: seeded runs see the same order.
        self._rng = np.random.default_rng(np.random.randint(2**31) if seed is None else seed)
        if shuffle:
            self._rng.shuffle(self._order)

    def __len__(self):
        return math.ceil(self._size / self.batch_size)

    def _select(self, values, indices):
        return [values[i] for i in indices]

    def __getitem__(self, index):
        indices = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        if self._packed is not None:
            inputs, labels, weights = self._packed
            return {k: v[indices] for k, v in inputs.items()}, labels[indices], weights[indices]
        if isinstance(self.data, dict):
            batch = {key: self._select(value, indices) for key, value in self.data.items()}
        else:
            batch = self._select(self.data, indices)
        return self.preprocessor(batch)

    def on_epoch_end(self):
        if self.shuffle:
            self._rng.shuffle(self._order)


def _map_tf_dataset(dataset, preprocessor, batch_size):
    import tensorflow as tf

    spec = dataset.element_spec
    keys = sorted(spec) if isinstance(spec, dict) else None
    first_spec = spec[keys[0]] if keys else spec
    if first_spec.shape.rank == 0:
        dataset = dataset.batch(batch_size or _DEFAULT_BATCH_SIZE)
    length = preprocessor.sequence_length

    def preprocess(*columns):
        columns = [[s.decode("utf-8") for s in c.tolist()] for c in columns]
        x = dict(zip(keys, columns)) if keys else columns[0]
        inputs, labels, weights = preprocessor(x)
        return inputs["token_ids"], inputs["padding_mask"], labels, weights

    def mapped(element):
        columns = [element[k] for k in keys] if keys else [element]
        outputs = tf.numpy_function(preprocess, columns, (tf.int32, tf.int32, tf.int32, tf.float32))
        for tensor in outputs:
            tensor.set_shape((None, length))
        token_ids, padding_mask, labels, weights = outputs
        return {"token_ids": token_ids, "padding_mask": padding_mask}, labels, weights

    return dataset.map(mapped, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def adapt_fit_inputs(preprocessor, x, y, sample_weight, batch_size, shuffle):
    """Returns `(x, y, sample_weight, batch_size)` ready for `keras.Model.fit`.

    Raw text (strings, `{"prompts", "responses"}` dicts, `tf.data` pipelines
    of either) goes through `preprocessor`; anything else passes unchanged.
    """
    if isinstance(x, (list, tuple, np.ndarray)) and len(x) == 0:
        raise ValueError("The training data is empty: pass at least one example.")
    if isinstance(x, tuple) and len(x) in (1, 2, 3) and y is None and _is_raw_text(x[0]):
        x = x[0]  # validation_data=(texts,) style
    if isinstance(x, TextDataset):
        # `load_dataset` data reads its own batches from disk: raw `RawBatches`
        # for files and Hugging Face, a `tf.data` pipeline of strings for TFDS.
        x = x.batches(batch_size or _DEFAULT_BATCH_SIZE, shuffle=bool(shuffle))
    raw = _is_raw_text(x) or isinstance(x, RawBatches)
    tf_data = _is_tf_dataset(x)
    if not raw and not (tf_data and _tf_dataset_is_text(x)):
        return x, y, sample_weight, batch_size
    if preprocessor is None:
        raise ValueError(
            "This model has no preprocessor, so it cannot train on raw text. "
            "Attach a GemmaCausalLMPreprocessor or pass "
            "{'token_ids', 'padding_mask'} arrays with labels."
        )
    if y is not None or sample_weight is not None:
        raise ValueError(
            "With raw text, labels and sample weights come from the "
            "preprocessor; do not pass `y` or `sample_weight`."
        )
    if tf_data:
        return _map_tf_dataset(x, preprocessor, batch_size), None, None, None
    if isinstance(x, RawBatches):
        return x.map(preprocessor), None, None, None
    batches = PreprocessedBatches(
        x, preprocessor, batch_size or _DEFAULT_BATCH_SIZE, shuffle=bool(shuffle)
    )
    return batches, None, None, None


def _tf_dataset_is_text(dataset):
    import tensorflow as tf

    spec = dataset.element_spec
    specs = spec.values() if isinstance(spec, dict) else [spec]
    return all(isinstance(s, tf.TensorSpec) and s.dtype == tf.string for s in specs)
