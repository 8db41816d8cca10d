"""Preference data, pairs of answers to the same prompt, and what the models
trained on it share.

`check_preferences` validates `{"prompts", "chosen", "rejected"}` (or
conversations) with errors that name the fix, `preference_batch` turns a
batch of it into padded arrays, and `PreferenceModel` is the base of
`GemmaRewardModel` and `GemmaDPO`: their `compile`, `fit` and `evaluate`.
"""

import contextlib
import math
import numbers
import warnings

import keras
import numpy as np

from keras_gemma import internals
from keras_gemma import lora
from keras_gemma.data import PreprocessedBatches

# Columns of preference data: `margin` is the reward model's optional
# per-row margin; the `reference_*` columns are DPO's precomputed reference
# log-probabilities (TRL's `precompute_ref_log_probs`).
PREFERENCE_FIELDS = ("prompts", "chosen", "rejected")
OPTIONAL_NUMERIC_FIELDS = ("margin", "reference_chosen_logps", "reference_rejected_logps")
# Keys people write from other libraries' formats, and what we call them.
_ALIASES = {
    "prompt": "prompts",
    "responses": "chosen/rejected",
    "response": "chosen/rejected",
    "ref_chosen_logps": "reference_chosen_logps",
    "ref_rejected_logps": "reference_rejected_logps",
    "margins": "margin",
}


# Preference data.


def _is_conversation(item):
    return isinstance(item, (list, tuple)) and all(isinstance(m, dict) for m in item)


def _column(x, key):
    values = x[key]
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise ValueError(
                f"Preference column {key!r} must be 1-D, one entry per pair; received an "
                f"array of shape {values.shape}."
            )
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise TypeError(
            f"Preference column {key!r} must be a list with one entry per pair; received "
            f"{type(values).__name__}. Wrap a single pair's values in lists."
        )
    return list(values)


def check_preferences(x, allowed_numeric=OPTIONAL_NUMERIC_FIELDS):
    """Validates preference data; returns it as a dict of equal-length lists.

    Accepted layouts (TRL's, with our plural `prompts`):
    `{"prompts": [str], "chosen": [str], "rejected": [str]}` (responses to
    prompts), `{"chosen": [str], "rejected": [str]}` (whole texts), and
    conversations: `{"chosen": [messages], "rejected": [messages]}`, each a
    list of `{"role", "content"}` dicts ending on a model turn, optionally
    after `"prompts": [messages]` that both continue. Optional numeric
    columns: `margin` (reward model), `reference_chosen_logps` and
    `reference_rejected_logps` (DPO).

    Example:
    >>> data = check_preferences({"prompts": ["2+2="], "chosen": ["4"], "rejected": ["5"]})
    >>> data["chosen"], data["prompts"]
    (['4'], ['2+2='])
    >>> check_preferences({"prompts": ["2+2="], "chosen": ["4"]})
    Traceback (most recent call last):
    ...
    ValueError: Preference data is missing ['rejected']: give {'prompts', 'chosen', \
'rejected'} (prompts optional), one entry per pair.
    """
    if not isinstance(x, dict):
        raise TypeError(
            "Preference data must be a dict of equal-length lists: {'prompts', 'chosen', "
            "'rejected'} (prompts optional; conversations allowed), optionally 'margin'. "
            f"Received {type(x).__name__}."
        )
    allowed = set(PREFERENCE_FIELDS) | set(allowed_numeric)
    unknown = sorted(set(x) - allowed)
    if unknown:
        hints = [f"{k!r} -> {_ALIASES[k]!r}" for k in unknown if k in _ALIASES]
        raise ValueError(
            f"Unknown preference data keys {unknown}; expected {sorted(allowed)}."
            + (f" Rename {', '.join(hints)}." if hints else "")
        )
    missing = [k for k in ("chosen", "rejected") if k not in x]
    if missing:
        raise ValueError(
            f"Preference data is missing {missing}: give {{'prompts', 'chosen', 'rejected'}} "
            "(prompts optional), one entry per pair."
        )
    data = {key: _column(x, key) for key in x}
    sizes = {key: len(values) for key, values in data.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"Every preference column must have one entry per pair; got sizes {sizes}. "
            "Give as many chosen and rejected responses (and prompts, margins) as pairs."
        )
    if sizes["chosen"] == 0:
        raise ValueError("The preference data is empty: give at least one pair.")
    conversational = _is_conversation(data["chosen"][0])
    for key in ("prompts", "chosen", "rejected"):
        if key not in data:
            continue
        for i, item in enumerate(data[key]):
            if conversational and not _is_conversation(item):
                raise TypeError(
                    f"Preference row {i}: {key!r} is {type(item).__name__}, but 'chosen' "
                    "holds conversations (lists of {'role', 'content'} dicts); give every "
                    "prompt, chosen and rejected entry in one format."
                )
            if not conversational:
                if isinstance(item, bytes):
                    data[key][i] = item = item.decode("utf-8")
                if not isinstance(item, str):
                    raise TypeError(
                        f"Preference row {i}: {key!r} must be a string (or every entry a "
                        f"conversation); received {type(item).__name__}: {item!r}"
                    )
    for key in allowed_numeric:
        if key in data:
            for i, value in enumerate(data[key]):
                if isinstance(value, bool) or not isinstance(value, numbers.Real):
                    raise TypeError(
                        f"Preference row {i}: {key!r} must be a number; received {value!r}."
                    )
                if not math.isfinite(value):
                    raise ValueError(f"Preference row {i}: {key!r} is {value}, not finite.")
            data[key] = [float(v) for v in data[key]]
    return data


def _examples(preprocessor, prompts, responses):
    """`(ids, weights)` per row, as supervised fine-tuning tokenizes them:
    weights are 1 on the response (or the model turns), 0 on the prompt."""
    if responses and _is_conversation(responses[0]):
        if prompts is not None:
            responses = [list(p) + list(r) for p, r in zip(prompts, responses)]
        return preprocessor.tokenize_examples({"messages": responses})
    if prompts is None:
        return preprocessor.tokenize_examples(responses)
    return preprocessor.tokenize_examples({"prompts": prompts, "responses": responses})


def pad_examples(examples, length, pad_token_id, end_token_id=None):
    """Right-pads `(ids, weights)` rows to `length`.

    With `end_token_id`, every row ends with that token, appended if it does
    not (a row that is too long keeps it in its last slot), so a reward read
    at the last real token is always read at an end token.

    Returns `(token_ids, padding_mask, completion_mask)`, int32 `[rows, length]`.
    """
    token_ids = np.full((len(examples), length), pad_token_id, "int32")
    padding_mask = np.zeros((len(examples), length), "int32")
    completion_mask = np.zeros((len(examples), length), "int32")
    for i, (ids, weights) in enumerate(examples):
        ids, weights = list(ids), list(weights)
        if end_token_id is not None:
            if not ids or ids[-1] != end_token_id:
                ids, weights = ids + [end_token_id], weights + [1.0]
            if len(ids) > length:
                ids, weights = ids[: length - 1] + ids[-1:], weights[: length - 1] + weights[-1:]
        ids, weights = ids[:length], weights[:length]
        token_ids[i, : len(ids)] = ids
        padding_mask[i, : len(ids)] = 1
        completion_mask[i, : len(ids)] = np.asarray(weights) > 0
    return token_ids, padding_mask, completion_mask


def preference_batch(preprocessor, batch, append_end_token=True, sequence_length=None):
    """One batch of checked preference data as model inputs.

    Returns `{"chosen_token_ids", "chosen_padding_mask",
    "chosen_completion_mask", "rejected_..."}` (int32 `[batch, length]`,
    the completion mask 1 on response tokens) plus each numeric column as a
    float32 `[batch]` array.
    """
    length = sequence_length or preprocessor.sequence_length
    tokenizer = preprocessor.tokenizer
    end = tokenizer.end_token_id if append_end_token else None
    prompts = batch.get("prompts")
    inputs = {}
    for side in ("chosen", "rejected"):
        examples = _examples(preprocessor, prompts, batch[side])
        appended = [end is not None and (not ids or ids[-1] != end) for ids, _ in examples]
        if any(len(ids) + extra > length for (ids, _), extra in zip(examples, appended)):
            # Truncation can cut off what tells chosen from rejected, leaving
            # a pair nothing can learn from (TRL drops such rows instead).
            warnings.warn(
                f"Some preference rows are longer than sequence_length={length} tokens and "
                "are truncated (the end of the response is lost). Raise the preprocessor's "
                "`sequence_length` or shorten the prompts.",
                stacklevel=2,
            )
        ids, mask, completion = pad_examples(examples, length, tokenizer.pad_token_id, end)
        inputs[f"{side}_token_ids"] = ids
        inputs[f"{side}_padding_mask"] = mask
        inputs[f"{side}_completion_mask"] = completion
    for key in OPTIONAL_NUMERIC_FIELDS:
        if key in batch:
            inputs[key] = np.asarray(batch[key], "float32")
    return inputs


# Training on it.


@contextlib.contextmanager
def dropout_disabled(model):
    """Sets every dropout rate inside `model` to 0 for the block, as TRL's
    `disable_dropout` does: a preference loss compares two forward passes,
    and dropout noise in either swamps the difference (trl #3500).

    Rates are Python state read while tracing, so a `fit` inside the block
    traces without dropout; gradient checkpointing still applies.
    """
    layers = [
        layer
        for layer in internals.flatten_layers(model)
        if isinstance(layer, keras.layers.Dropout) and layer.rate > 0
    ]
    rates = [layer.rate for layer in layers]
    for layer in layers:
        layer.rate = 0.0
    try:
        yield
    finally:
        for layer, rate in zip(layers, rates):
            layer.rate = rate


def reject_labels(y, sample_weight):
    if y is not None or sample_weight is not None:
        raise ValueError(
            "Preference data carries its own targets (chosen over rejected): pass only `x`, "
            "without `y` or `sample_weight`. Weight pairs with a 'margin' column instead."
        )


def is_batched(x):
    """Whether `x` already yields model inputs (a `PyDataset` or `tf.data`
    pipeline, e.g. one mapping `model.preprocess` over preference batches)."""
    return isinstance(x, keras.utils.PyDataset) or hasattr(x, "element_spec")


def preference_batches(data, preprocess, batch_size, shuffle):
    """A `PyDataset` preprocessing checked preference data a batch at a time."""
    return PreprocessedBatches(data, preprocess, batch_size or 32, shuffle=bool(shuffle))


def default_optimizer(learning_rate):
    optimizer = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=0.01)
    optimizer.exclude_from_weight_decay(var_names=["scale"])  # RMSNorm scales
    return optimizer


class PreferenceModel(keras.Model):
    """What the models trained on preference pairs share (`GemmaRewardModel`,
    `GemmaDPO`; see their examples): `compile` with AdamW by default, and
    `fit`/`evaluate` that take preference data as a dict (see
    `check_preferences`) or batches of `preprocess` outputs (a `PyDataset`
    or `tf.data`), with dropout off while fitting when `disable_dropout`.

    A subclass sets `default_learning_rate` and `disable_dropout`, and
    defines `trained_backbone` (checked for training through int8 weights),
    `_check(x)` (the checked data, errors naming the fix) and
    `preprocess(batch)`.
    """

    default_learning_rate = 1e-5

    def compile(self, optimizer="auto", **kwargs):
        """`keras.Model.compile`; `"auto"` is AdamW at the model's
        `default_learning_rate` (reward model 1e-5; DPO 1e-6, TRL's), weight
        decay 0.01, none on norm scales. The loss is always the model's own
        (`compute_loss`)."""
        if optimizer == "auto":
            optimizer = default_optimizer(self.default_learning_rate)
        super().compile(optimizer=optimizer, **kwargs)

    def _preference_inputs(self, x, y, sample_weight, batch_size, shuffle):
        reject_labels(y, sample_weight)
        if is_batched(x):
            return x
        return preference_batches(self._check(x), self.preprocess, batch_size, shuffle)

    def fit(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        """`keras.Model.fit` on preference data (a dict, see `check_preferences`),
        or on batches of `preprocess` outputs (a `PyDataset` or `tf.data`)."""
        if not self.compiled:
            self.compile()
        lora.check_trainable_through_int8(self.trained_backbone)
        batches = self._preference_inputs(
            x, y, sample_weight, batch_size, kwargs.pop("shuffle", True)
        )
        if kwargs.get("validation_data") is not None:
            kwargs["validation_data"] = self._preference_inputs(
                kwargs["validation_data"], None, None, batch_size, False
            )
        context = dropout_disabled(self) if self.disable_dropout else contextlib.nullcontext()
        with context:
            return super().fit(batches, **kwargs)

    def evaluate(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        """The loss and metrics on held-out preference data."""
        if not self.compiled:
            self.compile()
        batches = self._preference_inputs(x, y, sample_weight, batch_size, False)
        return super().evaluate(batches, **kwargs)
