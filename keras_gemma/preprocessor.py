"""GemmaCausalLMPreprocessor: strings to packed, shifted training batches."""

import keras
import numpy as np

from keras_gemma import checkpoints
from keras_gemma.chat import conversation_turns
from keras_gemma.chat import turn_segments
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
    weight: supervised fine-tuning. Given `{"messages": [conversation, ...]}`,
    each conversation (a list of `{"role", "content"}` dicts, see
    `chat.conversation_turns`) is written in Gemma's turn format and only the
    model turns, each with its `<end_of_turn>`, carry loss weight.

    With `packing=True`, short examples share rows: inputs gain `segment_ids`,
    attention stays within an example and positions restart at each one.

    Everything runs in NumPy, so it needs no TensorFlow and serves every
    backend; `GemmaCausalLM.fit` also maps it over `tf.data` pipelines.

    Args:
        tokenizer: a `GemmaTokenizer`.
        sequence_length: length of the packed model inputs.
        add_start_token: prepend `<bos>`.
        add_end_token: append `<eos>` (training only; never for prompts;
            conversations end at `<end_of_turn>`).
        packing: pack several examples into each row.

    Example:
    >>> from keras_gemma.tokenizer import GemmaTokenizer, train_sentencepiece
    >>> tokenizer = GemmaTokenizer(train_sentencepiece(["the quick fox"] * 50, 280))
    >>> preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=8)
    >>> x, y, sample_weight = preprocessor(["the fox"])
    >>> x["token_ids"].shape, y.shape
    ((1, 8), (1, 8))
    """

    tokenizer_cls = GemmaTokenizer  # what `from_preset` builds, as in keras-hub

    def __init__(
        self,
        tokenizer,
        sequence_length=1024,
        add_start_token=True,
        add_end_token=True,
        packing=False,
    ):
        if not isinstance(sequence_length, int) or sequence_length < 1:
            raise ValueError(
                f"`sequence_length` must be a positive integer. Received: {sequence_length!r}"
            )
        self.tokenizer = tokenizer
        self.sequence_length = sequence_length
        self.add_start_token = add_start_token
        self.add_end_token = add_end_token
        self.packing = packing

    def _pad(self, rows, length):
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

    def tokenize_examples(self, x):
        """Raw training examples to unpadded `(ids, weights)` pairs.

        `weights[j]` is the loss weight of predicting token `j`: 1 on text,
        responses and model turns (with their `<eos>` / `<end_of_turn>`), 0 on
        prompts, user turns and the turn markers around them.

        >>> from keras_gemma.tokenizer import GemmaTokenizer, train_sentencepiece
        >>> tokenizer = GemmaTokenizer(train_sentencepiece(["the quick fox"] * 50, 280))
        >>> preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=8)
        >>> [w for _, w in preprocessor.tokenize_examples(
        ...     {"prompts": ["the"], "responses": ["fox"]})]
        [[0.0, 0.0, 0.0, 1.0, 1.0]]
        """
        if isinstance(x, dict) and "messages" in x:
            return self._tokenize_conversations(x)
        if isinstance(x, dict):
            missing = {"prompts", "responses"} - set(x)
            if missing:
                raise ValueError(
                    "A dict input must have 'prompts' and 'responses' keys (or 'messages'); "
                    f"missing {sorted(missing)}. Received keys: {sorted(x)}"
                )
            prompts, _ = as_string_list(x["prompts"], "`prompts`")
            responses, _ = as_string_list(x["responses"], "`responses`")
            if len(prompts) != len(responses):
                raise ValueError(
                    "`prompts` and `responses` must have the same length. "
                    f"Received {len(prompts)} prompts and {len(responses)} responses."
                )
            examples = []
            for prompt, response in zip(
                self.tokenizer.tokenize(prompts), self.tokenizer.tokenize(responses)
            ):
                prompt, response = self._start() + prompt, response + self._end()
                examples.append((prompt + response, [0.0] * len(prompt) + [1.0] * len(response)))
            return examples
        texts, _ = as_string_list(x, "`x`")
        rows = [self._start() + ids + self._end() for ids in self.tokenizer.tokenize(texts)]
        return [(row, [1.0] * len(row)) for row in rows]

    def _tokenize_conversations(self, x):
        conversations = x["messages"]
        if isinstance(conversations, np.ndarray):
            conversations = conversations.tolist()
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise ValueError(
                "'messages' must be a non-empty list of conversations, each a list of "
                "{'role', 'content'} dicts."
            )
        segments = []  # per conversation, `(text, is_reply)` pieces
        for i, messages in enumerate(conversations):
            turns = conversation_turns(messages)
            if turns[-1][0] != "model":
                raise ValueError(
                    f"Conversation {i} ends on a user turn, so it has nothing to learn "
                    "after it: end each training conversation with a model turn."
                )
            segments.append(turn_segments(turns)[:-1])  # no newline after the last reply
        flat = self.tokenizer.tokenize([text for pieces in segments for text, _ in pieces])
        examples, k = [], 0
        for pieces in segments:
            ids, weights = list(self._start()), [0.0] * len(self._start())
            for _, is_reply in pieces:
                ids += flat[k]
                weights += [float(is_reply)] * len(flat[k])
                k += 1
            examples.append((ids, weights))
        return examples

    def pack(self, examples, sequence_length=None):
        """Packs `(ids, weights)` examples into shared rows (first fit, longest first).

        Returns `(inputs, labels, sample_weight)` like `__call__`; `inputs`
        also has `segment_ids` (1, 2, ... per example in a row, 0 on padding),
        which keep attention within an example and restart its positions.
        Examples longer than a row are truncated.
        """
        length = sequence_length or self.sequence_length
        # An example of n tokens fills n - 1 positions: inputs and labels
        # are shifted within it, so no label crosses into the next example.
        pieces = [(ids[: length + 1], w[: length + 1]) for ids, w in examples if len(ids) > 1]
        pieces.sort(key=lambda piece: -len(piece[0]))
        rows, free = [], []
        for piece in pieces:
            size = len(piece[0]) - 1
            row = next((r for r in range(len(rows)) if free[r] >= size), None)
            if row is None:
                rows.append([])
                free.append(length)
                row = len(rows) - 1
            rows[row].append(piece)
            free[row] -= size
        shape = (len(rows), length)
        token_ids = np.full(shape, self.tokenizer.pad_token_id, "int32")
        labels = np.full(shape, self.tokenizer.pad_token_id, "int32")
        sample_weight = np.zeros(shape, "float32")
        segment_ids = np.zeros(shape, "int32")
        for r, row in enumerate(rows):
            at = 0
            for segment, (ids, weights) in enumerate(row, start=1):
                end = at + len(ids) - 1
                token_ids[r, at:end], labels[r, at:end] = ids[:-1], ids[1:]
                sample_weight[r, at:end] = weights[1:]
                segment_ids[r, at:end] = segment
                at = end
        inputs = {
            "token_ids": token_ids,
            "padding_mask": (segment_ids > 0).astype("int32"),
            "segment_ids": segment_ids,
        }
        return inputs, labels, sample_weight

    def __call__(self, x, y=None, sample_weight=None, sequence_length=None):
        if y is not None or sample_weight is not None:
            raise ValueError(
                "GemmaCausalLMPreprocessor makes its own labels and sample "
                "weights from the text; pass only `x` (strings, or a dict "
                "with 'prompts' and 'responses', or with 'messages')."
            )
        examples = self.tokenize_examples(x)
        if self.packing:
            return self.pack(examples, sequence_length)
        length = (sequence_length or self.sequence_length) + 1
        token_ids, padding_mask = self._pad([ids for ids, _ in examples], length)
        weights = np.zeros(token_ids.shape, "float32")
        for i, (_, row_weights) in enumerate(examples):
            row_weights = row_weights[:length]
            weights[i, : len(row_weights)] = row_weights
        inputs = {"token_ids": token_ids[:, :-1], "padding_mask": padding_mask[:, :-1]}
        # Labels are shifted by one, so a token's weight moves with it.
        return inputs, token_ids[:, 1:], weights[:, 1:]

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
        token_ids, padding_mask = self._pad(rows, length)
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
            "packing": self.packing,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["tokenizer"] = keras.saving.deserialize_keras_object(config["tokenizer"])
        return cls(**config)
