"""Generation: prompt checks, length buckets, the compile cache, and
`generate` / `generate_stream` built from one prefill and one step.

A decoder (see `keras_gemma.backends`) computes logits; the sampler turns
them into tokens. A generation starts by prefilling the prompts and, where the
sampler allows, draws the first token from the prefill's own logits;
`generate` then runs the sampler's whole loop in one compiled call, and
`stream` one compiled step per token.
"""

import math

import numpy as np
from keras import ops
from keras import tree

from keras_gemma import backends

# Sequence lengths are padded up to buckets (16, 24, 32, 48, 64, 96, ...:
# powers of two and their midpoints), so new prompt lengths or `max_length`s
# reuse a compiled loop, while padding wastes at most a third.
MIN_BUCKET = 16


def bucket(length):
    """The bucketed length for `length` tokens.

    Example:
    >>> [bucket(n) for n in (1, 17, 24, 25, 33, 100)]
    [16, 24, 24, 32, 48, 128]
    """
    power = 2 ** math.ceil(math.log2(max(length, MIN_BUCKET)))
    return power * 3 // 4 if length <= power * 3 // 4 and power > MIN_BUCKET else power


def check_token_ids(token_ids, vocabulary_size):
    """`token_ids` as a 2-D int32 NumPy array of ids in the vocabulary."""
    token_ids = np.asarray(ops.convert_to_numpy(token_ids))
    if token_ids.ndim != 2:
        raise ValueError(
            "`token_ids` must be a 2-D `[batch, sequence]` array. "
            f"Received shape {token_ids.shape}."
        )
    if not np.issubdtype(token_ids.dtype, np.integer):
        raise TypeError(f"`token_ids` must be integers. Received dtype {token_ids.dtype}.")
    if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= vocabulary_size):
        bad = token_ids[(token_ids < 0) | (token_ids >= vocabulary_size)]
        raise ValueError(
            f"Token ids must be in [0, {vocabulary_size}) for this model's "
            f"vocabulary; found {sorted(set(bad.tolist()))[:10]}. Check that "
            "the tokenizer matches the model."
        )
    return token_ids.astype("int32")


def prepare_prompts(token_ids, padding_mask, vocabulary_size):
    """Validates right-padded prompts and pads their width to its bucket.

    Returns `(padded_ids, prompt_lengths, max_length)`, NumPy.
    """
    token_ids = check_token_ids(token_ids, vocabulary_size)
    padding_mask = np.asarray(ops.convert_to_numpy(padding_mask)).astype(bool)
    if padding_mask.shape != token_ids.shape:
        raise ValueError(
            "`padding_mask` must have the shape of `token_ids`; received "
            f"{padding_mask.shape} and {token_ids.shape}."
        )
    batch_size, max_length = token_ids.shape
    prompt_lengths = padding_mask.sum(axis=1).astype("int32")
    if not np.array_equal(padding_mask, np.arange(max_length) < prompt_lengths[:, None]):
        raise ValueError(
            "Prompts must be right-padded: `padding_mask` must be 1 on a "
            "prefix of each row and 0 after it."
        )
    if prompt_lengths.min() < 1:
        raise ValueError("Every prompt needs at least one token (e.g. the start token).")
    if prompt_lengths.max() >= max_length:
        raise ValueError(
            f"`max_length`={max_length} must be greater than the longest "
            f"prompt ({prompt_lengths.max()} tokens) to leave room to generate."
        )
    padded = np.zeros((batch_size, bucket(max_length)), "int32")
    padded[:, :max_length] = token_ids
    return padded, prompt_lengths, max_length


class KerasDecoder:
    """The default decoder: `GemmaBackbone.compute_hidden_states`, the one
    forward pass, with the model's step logits."""

    def __init__(self, model):
        self.model = model

    def prefill(self, token_ids, prefill_length, start):
        backbone = self.model.backbone
        cache = backbone.empty_cache(*ops.shape(token_ids))
        # Slots past a shorter prompt are overwritten by the decode steps
        # before any query can see them.
        hidden, cache = backbone.compute_hidden_states(token_ids[:, :prefill_length], cache=cache)
        return cache, self.model.compute_step_logits(ops.take(hidden, start - 1, axis=1))

    def next_logits(self, token_ids, cache, index):
        # Beam search widens the batch, so read it from `token_ids`.
        token = ops.slice(token_ids, [0, index - 1], [ops.shape(token_ids)[0], 1])
        hidden, cache = self.model.backbone.compute_hidden_states(
            token, cache=cache, cache_update_index=index - 1
        )
        return self.model.compute_step_logits(hidden[:, 0]), cache


class Generator:
    """One model's generation: picks the decoder, compiles, caches.

    Compiled functions are cached per shape bucket, stop tokens and the
    model's current variables; when the variables change (`quantize()`,
    `merge_lora()`, a reload) the cache is dropped, and with it the old
    weights it held.
    """

    def __init__(self, model):
        self.model = model
        self.clear()

    def clear(self):
        self._functions = {}
        self._variables = ()

    def _decoder(self):
        return backends.decoder_for(self.model.backbone) or KerasDecoder(self.model)

    def _compiled(self, key, build, whole_loop=True):
        """`build(decoder)` compiled for this backend, cached per key and weights."""
        variables = tuple(map(id, self.model.variables))
        if variables != self._variables:
            self.clear()
            self._variables = variables
        if key not in self._functions:
            decoder = self._decoder()
            function = backends.compile_stateless(build(decoder), self.model, whole_loop)
            if getattr(decoder, "eager", False):
                return function  # it reads this call's weights: nothing to cache
            self._functions[key] = function
        return self._functions[key]

    def _start(self, decoder, prefill_length, num_samples=1):
        sampler = self.model.sampler

        def start(token_ids, prompt_lengths, seed):
            index = ops.min(prompt_lengths)
            cache, logits = decoder.prefill(token_ids, prefill_length, index)
            if num_samples > 1:
                # One prefill per prompt serves its samples: its rows (cache
                # included) are repeated after it, and decoding draws each
                # sample's tokens independently from there.
                def repeat(x):
                    return ops.repeat(x, num_samples, axis=0)

                token_ids, prompt_lengths, logits = map(repeat, (token_ids, prompt_lengths, logits))
                cache = tree.map_structure(repeat, cache)
            mask = ops.arange(ops.shape(token_ids)[1])[None, :] < prompt_lengths[:, None]
            if sampler.first_token_from_prefill:  # one decode step fewer
                token_ids, cache, index, seed = sampler.step(
                    lambda *_: (logits, cache), token_ids, cache, index, mask, seed
                )
            return token_ids, cache, index, mask, seed

        return start

    def generate(self, token_ids, padding_mask, stop_token_ids=(), num_samples=1):
        """Generates into the padding of right-padded `token_ids`; returns
        `(token_ids, prompt_lengths, max_length)`, NumPy.

        With `num_samples=k`, each prompt is prefilled once and continued
        `k` times: rows `i * k ... i * k + k - 1` of the output are prompt
        `i`'s samples (what repeating each prompt `k` times gives, without
        `k` prefills of it).
        """
        model = self.model
        padded, prompt_lengths, max_length = prepare_prompts(
            token_ids, padding_mask, model.backbone.vocabulary_size
        )
        prefill_length = bucket(int(prompt_lengths.max()))

        def build(decoder):
            start = self._start(decoder, prefill_length, num_samples)

            def generate(token_ids, prompt_lengths, max_length, seed):
                token_ids, cache, index, mask, seed = start(token_ids, prompt_lengths, seed)
                state = (token_ids, cache, index, mask, max_length, stop_token_ids, seed)
                return model.sampler(decoder.next_logits, *state)

            return generate

        function = self._compiled(("generate", prefill_length, stop_token_ids, num_samples), build)
        output, seed = function(
            ops.convert_to_tensor(padded),
            ops.convert_to_tensor(prompt_lengths),
            ops.convert_to_tensor(max_length, "int32"),
            model.sampler.initial_seed(),
        )
        self._advance_seed(seed)
        prompt_lengths = np.repeat(prompt_lengths, num_samples)
        return np.asarray(ops.convert_to_numpy(output))[:, :max_length], prompt_lengths, max_length

    def stream(self, token_ids, padding_mask):
        """Yields the token ids generated for one right-padded prompt, one
        compiled step each; the caller decides when to stop."""
        model = self.model
        if not model.sampler.streams:
            raise ValueError(
                f"{type(model.sampler).__name__} cannot stream token by token (its "
                "candidates change until the end); compile with a sampling sampler "
                "(e.g. 'greedy' or 'top_k') or use `generate`."
            )
        padded, prompt_lengths, max_length = prepare_prompts(
            token_ids, padding_mask, model.backbone.vocabulary_size
        )
        prefill_length = bucket(int(prompt_lengths[0]))
        start = self._compiled(
            ("start", prefill_length), lambda d: self._start(d, prefill_length), whole_loop=False
        )
        step = self._compiled(
            "step",
            lambda d: lambda *state: model.sampler.step(d.next_logits, *state),
            whole_loop=False,
        )
        seed = model.sampler.initial_seed()
        ids, cache, index, mask, seed = start(
            ops.convert_to_tensor(padded), ops.convert_to_tensor(prompt_lengths), seed
        )
        try:
            for position in range(int(prompt_lengths[0]), max_length):
                if position >= int(ops.convert_to_numpy(index)):
                    ids, cache, index, seed = step(ids, cache, index, mask, seed)
                yield int(ops.convert_to_numpy(ids[0, position]))
        finally:
            self._advance_seed(seed)

    def _advance_seed(self, seed):
        if self.model.sampler.seed_generator is not None:
            self.model.sampler.seed_generator.state.assign(seed)
