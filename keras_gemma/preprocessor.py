"""GemmaCausalLMPreprocessor: strings to packed, shifted training batches."""

import keras
import numpy as np

from keras_gemma import checkpoints
from keras_gemma.presets import PRESETS
from keras_gemma.tokenizer import GemmaTokenizer


def as_string_list(inputs, what):
    """Validates a string or a batch of strings; returns `(list, was_single)`.

    `what` names the argument in error messages.

    >>> as_string_list("Hi", "The prompt")
    (['Hi'], True)
    >>> as_string_list([b"a", "b"], "The prompts")
    (['a', 'b'], False)
    """
    if isinstance(inputs, (str, bytes)):
        inputs = [inputs]
        single = True
    else:
        single = False
        if isinstance(inputs, np.ndarray):
            if inputs.ndim != 1:
                raise ValueError(
                    f"{what} must be a string or a 1-D batch of strings. "
                    f"Received an array of shape {inputs.shape}."
                )
            inputs = inputs.tolist()
        elif not isinstance(inputs, (list, tuple)):
            raise TypeError(
                f"{what} must be a string or a list of strings. Received: {type(inputs).__name__}"
            )
    if len(inputs) == 0:
        raise ValueError(f"{what} is empty: pass at least one string.")
    strings = []
    for i, item in enumerate(inputs):
        if isinstance(item, bytes):
            item = item.decode("utf-8")
        if not isinstance(item, str):
            raise TypeError(
                f"{what} must contain only strings; item {i} is {type(item).__name__}: {item!r}"
            )
        strings.append(item)
    return strings, single


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaCausalLMPreprocessor:
    """Turns text into `(inputs, labels, sample_weight)` for causal LM training.

    Each text becomes `<bos> tokens <eos>`, truncated and padded to
    `sequence_length + 1` tokens, then split into inputs (all but the last
    token) and labels (all but the first). Sample weights are 1 on real
    label tokens and 0 on padding.

    Given `{"prompts": [...], "responses": [...]}` instead, prompt and response
    are joined and only response tokens (and the closing `<eos>`) carry loss
    weight: supervised fine-tuning.

    Everything runs in NumPy, so it needs no TensorFlow and serves every
    backend; `GemmaCausalLM.fit` also maps it over `tf.data` pipelines.

    Args:
        tokenizer: a `GemmaTokenizer`.
        sequence_length: length of the packed model inputs.
        add_start_token: prepend `<bos>`.
        add_end_token: append `<eos>` (training only; never for prompts).

    Example:
    >>> from keras_gemma.tokenizer import GemmaTokenizer, train_sentencepiece
    >>> tokenizer = GemmaTokenizer(train_sentencepiece(["the quick fox"] * 50, 280))
    >>> preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=8)
    >>> x, y, sample_weight = preprocessor(["the fox"])
    >>> x["token_ids"].shape, y.shape
    ((1, 8), (1, 8))
    """

    tokenizer_cls = GemmaTokenizer  # what `from_preset` builds, as in keras-hub

    def __init__(self, tokenizer, sequence_length=1024, add_start_token=True, add_end_token=True):
        if not isinstance(sequence_length, int) or sequence_length < 1:
            raise ValueError(
                f"`sequence_length` must be a positive integer. Received: {sequence_length!r}"
            )
        self.tokenizer = tokenizer
        self.sequence_length = sequence_length
        self.add_start_token = add_start_token
        self.add_end_token = add_end_token

    def _pack(self, rows, length):
        """Right-pads `rows` of ids to `length`; returns ids and mask arrays."""
        token_ids = np.full((len(rows), length), self.tokenizer.pad_token_id, "int32")
        padding_mask = np.zeros((len(rows), length), "int32")
        for i, row in enumerate(rows):
            row = row[:length]
            token_ids[i, : len(row)] = row
            padding_mask[i, : len(row)] = 1
        return token_ids, padding_mask

    def _start(self):
        return [self.tokenizer.start_token_id] if self.add_start_token else []

    def _end(self):
        return [self.tokenizer.end_token_id] if self.add_end_token else []

    def __call__(self, x, y=None, sample_weight=None, sequence_length=None):
        if y is not None or sample_weight is not None:
            raise ValueError(
                "GemmaCausalLMPreprocessor makes its own labels and sample "
                "weights from the text; pass only `x` (strings, or a dict "
                "with 'prompts' and 'responses')."
            )
        length = (sequence_length or self.sequence_length) + 1
        if isinstance(x, dict):
            missing = {"prompts", "responses"} - set(x)
            if missing:
                raise ValueError(
                    "A dict input must have 'prompts' and 'responses' keys; "
                    f"missing {sorted(missing)}. Received keys: {sorted(x)}"
                )
            prompts, _ = as_string_list(x["prompts"], "`prompts`")
            responses, _ = as_string_list(x["responses"], "`responses`")
            if len(prompts) != len(responses):
                raise ValueError(
                    "`prompts` and `responses` must have the same length. "
                    f"Received {len(prompts)} prompts and {len(responses)} responses."
                )
            rows, weights = [], []
            for prompt, response in zip(
                self.tokenizer.tokenize(prompts), self.tokenizer.tokenize(responses)
            ):
                prompt = self._start() + prompt
                response = response + self._end()
                rows.append(prompt + response)
                weights.append([0.0] * len(prompt) + [1.0] * len(response))
            # Labels are shifted by one, so a token's weight moves with it.
            weights = [w[1:] for w in weights]
        else:
            texts, _ = as_string_list(x, "`x`")
            rows = [self._start() + ids + self._end() for ids in self.tokenizer.tokenize(texts)]
            weights = None
        token_ids, padding_mask = self._pack(rows, length)
        sample_weight = padding_mask[:, 1:].astype("float32")
        if weights is not None:
            for i, row_weights in enumerate(weights):
                row_weights = row_weights[: length - 1]
                sample_weight[i, : len(row_weights)] = row_weights
        inputs = {"token_ids": token_ids[:, :-1], "padding_mask": padding_mask[:, :-1]}
        return inputs, token_ids[:, 1:], sample_weight

    def generate_preprocess(self, x, sequence_length=None):
        """Prompts to right-padded `token_ids`/`padding_mask`, no `<eos>`.

        Raises a ValueError if a prompt does not leave room to generate.
        """
        prompts, _ = as_string_list(x, "The prompts")
        length = sequence_length or self.sequence_length
        rows = [self._start() + ids for ids in self.tokenizer.tokenize(prompts)]
        longest = max(len(row) for row in rows)
        if longest == 0:
            raise ValueError(
                "The prompts are empty after tokenization and there is no start "
                "token; give non-empty prompts or use add_start_token=True."
            )
        if longest >= length:
            raise ValueError(
                f"`max_length`={length} must be greater than the longest prompt, "
                f"which is {longest} tokens (start token included). Raise "
                "`max_length` or shorten the prompt."
            )
        token_ids, padding_mask = self._pack(rows, length)
        return {"token_ids": token_ids, "padding_mask": padding_mask}

    def generate_postprocess(self, x, skip_tokens=None, strip_lengths=None):
        """Generated `token_ids`/`padding_mask` back to strings.

        Padding and special markers (`<bos>`, `<eos>`, `<end_of_turn>`) are
        dropped; `strip_lengths[i]` tokens are cut from the front of row `i`
        (the prompt) when given.
        """
        token_ids = np.asarray(keras.ops.convert_to_numpy(x["token_ids"]))
        padding_mask = np.asarray(keras.ops.convert_to_numpy(x["padding_mask"])).astype(bool)
        special = {
            self.tokenizer.pad_token_id,
            self.tokenizer.start_token_id,
            self.tokenizer.end_token_id,
        }
        if self.tokenizer.end_of_turn_id is not None:
            special.add(self.tokenizer.end_of_turn_id)
        special.update(skip_tokens or ())
        texts = []
        for i, (row, mask) in enumerate(zip(token_ids, padding_mask)):
            start = 0 if strip_lengths is None else int(strip_lengths[i])
            ids = [int(t) for t in row[start:][mask[start:]] if int(t) not in special]
            texts.append(self.tokenizer.detokenize(ids))
        return texts

    presets = PRESETS  # read-only {name: metadata} of the Gemma 1 presets

    @classmethod
    def from_preset(cls, preset, load_weights=True, dtype=None, **kwargs):
        """The preset's tokenizer and sequence length; `kwargs` override them."""
        return checkpoints.load_preprocessor(cls, preset, **kwargs)

    def save_to_preset(self, preset_dir):
        """Writes tokenizer.json, preprocessor.json and the vocabulary, atomically."""
        checkpoints.save_preprocessor(self, preset_dir)

    def get_config(self):
        return {
            "tokenizer": keras.saving.serialize_keras_object(self.tokenizer),
            "sequence_length": self.sequence_length,
            "add_start_token": self.add_start_token,
            "add_end_token": self.add_end_token,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["tokenizer"] = keras.saving.deserialize_keras_object(config["tokenizer"])
        return cls(**config)
