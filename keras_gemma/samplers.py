"""Token samplers and the decode loop they drive.

Names and arguments follow keras-hub (`"greedy"`, `TopKSampler(k=5)`, ...).
A custom sampler subclasses `Sampler` and overrides `get_next_token`.
"""

import keras
from keras import ops
from keras import tree

from keras_gemma import backends

# Logit given to impossible candidates in beam search (finite, so sums stay
# ordered instead of turning into NaN).
_IMPOSSIBLE = -1e9


def _stopped_rows(token_ids, prompt_mask, stop_token_ids):
    """`[batch]` bool: the row has generated one of `stop_token_ids`."""
    is_stop = ops.zeros_like(prompt_mask)
    for stop_id in stop_token_ids:
        is_stop = ops.logical_or(is_stop, ops.equal(token_ids, stop_id))
    generated_stop = ops.logical_and(is_stop, ops.logical_not(prompt_mask))
    return ops.any(generated_stop, axis=-1)


def _keep_going(token_ids, index, prompt_mask, max_length, stop_token_ids):
    """The decode loop's condition: room left and some row not yet stopped."""
    going = index < max_length
    if stop_token_ids:
        all_stopped = ops.all(_stopped_rows(token_ids, prompt_mask, stop_token_ids))
        going = ops.logical_and(going, ops.logical_not(all_stopped))
    return going


class Sampler:
    """Base class: picks each next token from the model's distribution.

    The decode loop lives here (`__call__`); subclasses only decide how a
    token is drawn from `probabilities` in `get_next_token`. Random samplers
    draw from `self.seed_generator`; its state is threaded through the loop
    explicitly so compiled loops stay pure and a fixed `seed` reproduces.

    Generation reads two declarations: `streams` (it can decode one token
    per call, `step`) and `first_token_from_prefill` (its first token can be
    drawn from the prompt pass's logits, saving a decode step).

    Args:
        temperature: logits are divided by it before the softmax.

    Example:
    >>> import numpy as np
    >>> from keras import ops
    >>> class ArgmaxSampler(Sampler):
    ...     def get_next_token(self, probabilities):
    ...         return ops.argmax(probabilities, axis=-1)
    >>> int(ArgmaxSampler().get_next_token(np.array([[0.1, 0.9]]))[0])
    1
    """

    streams = True
    first_token_from_prefill = True

    def __init__(self, temperature=1.0):
        if temperature <= 0:
            raise ValueError(
                f"`temperature` must be positive. Received: {temperature}. "
                "Use the 'greedy' sampler for deterministic decoding."
            )
        self.temperature = temperature
        self.seed_generator = None
        self._seeded_draw = None  # (settings, draw), built by `_draw`

    def compute_probabilities(self, logits):
        logits = ops.cast(logits, "float32")
        return ops.softmax(logits / self.temperature, axis=-1)

    def get_next_token(self, probabilities):
        raise NotImplementedError

    def initial_seed(self):
        if self.seed_generator is None:
            return ops.zeros((2,), "int32")
        return self.seed_generator.state.value

    def _draw(self, probabilities, seed):
        if self.seed_generator is None:
            return self.get_next_token(probabilities), seed
        settings = self.get_config()
        if self._seeded_draw is None or self._seeded_draw[0] != settings:
            # One draw for the generate loop and a streaming step alike;
            # rebuilt when `k`, `p`, ... change, which TensorFlow's compiled
            # draw would otherwise keep as constants.
            draw = backends.compile_random_draw(self._draw_from)
            self._seeded_draw = (settings, draw)
        return self._seeded_draw[1](probabilities, seed)

    def _draw_from(self, probabilities, seed):
        state = self.seed_generator.state
        with keras.StatelessScope(state_mapping=[(state, seed)]) as scope:
            token = self.get_next_token(probabilities)
        return token, scope.get_current_value(state)

    def step(self, next, prompt, cache, index, mask, seed):
        """Decodes position `index`: one iteration of the loop in `__call__`.

        Streaming generation calls it directly, once per token.

        Returns:
            `(prompt, cache, index + 1, seed)`.
        """
        logits, cache = next(prompt, cache, index)
        token, seed = self._draw(self.compute_probabilities(logits), seed)
        token = ops.cast(token, prompt.dtype)
        # Write column `index`, except where it is still inside a (longer)
        # prompt, with elementwise ops: in eager PyTorch they cost a small
        # part of `take` + `slice_update` with a tensor index.
        column = ops.arange(ops.shape(prompt)[1])[None, :] == index
        write = ops.logical_and(column, ops.logical_not(mask))
        prompt = ops.where(write, token[:, None], prompt)
        return prompt, cache, index + 1, seed

    def __call__(self, next, prompt, cache, index, mask, max_length, stop_token_ids=(), seed=None):
        """Fills `prompt` from `index` up to `max_length`.

        Args:
            next: `next(prompt, cache, index) -> (logits, cache)`, the logits
                for position `index` given the tokens before it.
            prompt: `[batch, length]` token ids; prompt tokens are kept.
            cache: the model's KV cache, prefilled.
            index: first position to fill (the shortest prompt's length).
            mask: `[batch, length]` bool, True on prompt tokens.
            max_length: fill positions below this one.
            stop_token_ids: stop once every row generated one of these.
            seed: the seed generator's state (`initial_seed()`).

        Returns:
            `(token_ids, seed)`: the filled tokens and the advanced seed state.
        """
        if seed is None:
            seed = self.initial_seed()

        def cond(prompt, cache, index, seed):
            return _keep_going(prompt, index, mask, max_length, stop_token_ids)

        def body(prompt, cache, index, seed):
            return self.step(next, prompt, cache, index, mask, seed)

        prompt, _, _, seed = ops.while_loop(cond, body, (prompt, cache, index, seed))
        return prompt, seed

    def get_config(self):
        return {"temperature": self.temperature}


class GreedySampler(Sampler):
    """Always picks the most probable token.

    Example:
    >>> import numpy as np
    >>> int(GreedySampler().get_next_token(np.array([[0.2, 0.7, 0.1]]))[0])
    1
    """

    def compute_probabilities(self, logits):
        # The most probable token has the largest logit: skipping the softmax
        # (a visible part of a small model's CPU step) changes no pick, except
        # where rounding made two probabilities of unequal logits equal.
        return ops.cast(logits, "float32")

    def get_next_token(self, probabilities):
        return ops.argmax(probabilities, axis=-1)


class _SeededSampler(Sampler):
    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _categorical(self, probabilities, ids=None):
        """One draw per row, `[batch]`: the index drawn, or its entry of `ids`."""
        logits = ops.log(ops.maximum(probabilities, 1e-30))
        sample = keras.random.categorical(logits, 1, seed=self.seed_generator, dtype="int32")
        return sample[:, 0] if ids is None else ops.take_along_axis(ids, sample, axis=-1)[:, 0]

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


class RandomSampler(_SeededSampler):
    """Samples from the whole (temperature-scaled) distribution.

    Example:
    >>> import numpy as np
    >>> int(RandomSampler(seed=0).get_next_token(np.array([[0.0, 1.0]]))[0])
    1
    """

    def get_next_token(self, probabilities):
        return self._categorical(probabilities)


class TopKSampler(_SeededSampler):
    """Samples among the `k` most probable tokens.

    Example:
    >>> import numpy as np
    >>> sampler = TopKSampler(k=1, seed=0)
    >>> int(sampler.get_next_token(np.array([[0.1, 0.6, 0.3]]))[0])
    1
    """

    def __init__(self, k=5, seed=None, **kwargs):
        super().__init__(seed=seed, **kwargs)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be a positive integer. Received: k={k!r}")
        self.k = k

    def get_next_token(self, probabilities):
        k = min(self.k, probabilities.shape[-1])
        return self._categorical(*ops.top_k(probabilities, k=k))

    def get_config(self):
        return {**super().get_config(), "k": self.k}


class TopPSampler(_SeededSampler):
    """Nucleus sampling: the smallest set of tokens whose mass reaches `p`.

    Args:
        p: probability mass to keep, in (0, 1].
        k: optionally consider only the `k` most probable tokens first, which
            avoids sorting a 256k vocabulary.

    Example:
    >>> import numpy as np
    >>> sampler = TopPSampler(p=0.5, seed=0)
    >>> int(sampler.get_next_token(np.array([[0.1, 0.8, 0.1]]))[0])
    1
    """

    def __init__(self, p=0.1, k=None, seed=None, **kwargs):
        super().__init__(seed=seed, **kwargs)
        if not 0 < p <= 1:
            raise ValueError(f"`p` must be in (0, 1]. Received: p={p!r}")
        self.p = p
        self.k = k

    def get_next_token(self, probabilities):
        vocabulary_size = probabilities.shape[-1]
        k = vocabulary_size if self.k is None else min(self.k, vocabulary_size)
        sorted_probabilities, sorted_indices = ops.top_k(probabilities, k=k)
        # Keep a token if the mass before it is still below p; the most likely
        # token is therefore always kept.
        mass_before = ops.cumsum(sorted_probabilities, axis=-1) - sorted_probabilities
        kept = ops.where(mass_before < self.p, sorted_probabilities, 0.0)
        return self._categorical(kept, sorted_indices)

    def get_config(self):
        return {**super().get_config(), "p": self.p, "k": self.k}


class BeamSampler(Sampler):
    """Beam search: keeps the `num_beams` most likely continuations.

    Returns the most likely beam of each row. Rows are decoded independently;
    a beam that generated a stop token is frozen (padded, score unchanged).

    Example:
    >>> sampler = BeamSampler(num_beams=3)
    >>> sampler.num_beams
    3
    """

    streams = False  # candidates change until the end
    first_token_from_prefill = False  # its loop scores the first position itself

    def __init__(self, num_beams=5, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"`num_beams` must be a positive integer. Received: {num_beams!r}")
        self.num_beams = num_beams

    def __call__(self, next, prompt, cache, index, mask, max_length, stop_token_ids=(), seed=None):
        beams = self.num_beams
        batch = ops.shape(prompt)[0]

        def expand(x):
            return ops.repeat(x, beams, axis=0)  # [batch * beams, ...]

        prompt, mask = expand(prompt), expand(mask)
        cache = tree.map_structure(expand, cache)
        # Only the first beam of each row is live at the start; the others
        # would duplicate it.
        first_only = ops.convert_to_tensor([0.0] + [_IMPOSSIBLE] * (beams - 1))
        scores = ops.tile(first_only, (batch,))
        row_offsets = ops.repeat(ops.arange(batch) * beams, beams)

        def cond(prompt, cache, index, scores):
            return _keep_going(prompt, index, mask, max_length, stop_token_ids)

        def body(prompt, cache, index, scores):
            logits, cache = next(prompt, cache, index)
            log_probabilities = ops.log_softmax(
                ops.cast(logits, "float32") / self.temperature, axis=-1
            )
            vocabulary_size = ops.shape(log_probabilities)[-1]
            # Prompt positions and finished beams have one allowed token
            # (the prompt's, or padding) at no cost, so their score is kept.
            in_prompt = ops.take(mask, index, axis=1)
            forced_token = ops.where(in_prompt, ops.take(prompt, index, axis=1), 0)
            forced = in_prompt
            if stop_token_ids:
                forced = ops.logical_or(forced, _stopped_rows(prompt, mask, stop_token_ids))
            one_hot = ops.equal(ops.arange(vocabulary_size)[None, :], forced_token[:, None])
            forced_scores = ops.where(one_hot, 0.0, _IMPOSSIBLE)
            log_probabilities = ops.where(forced[:, None], forced_scores, log_probabilities)
            candidates = log_probabilities + scores[:, None]
            candidates = ops.reshape(candidates, (batch, beams * vocabulary_size))
            scores, choices = ops.top_k(candidates, k=beams)  # sorted, best first
            source_beam = ops.reshape(choices // vocabulary_size, (-1,)) + row_offsets
            token = ops.cast(ops.reshape(choices % vocabulary_size, (-1,)), prompt.dtype)
            prompt = ops.take(prompt, source_beam, axis=0)
            cache = tree.map_structure(lambda x: ops.take(x, source_beam, axis=0), cache)
            prompt = ops.slice_update(prompt, [0, index], token[:, None])
            return prompt, cache, index + 1, ops.reshape(scores, (-1,))

        prompt, _, _, scores = ops.while_loop(cond, body, (prompt, cache, index, scores))
        best = ops.reshape(prompt, (batch, beams, -1))[:, 0]
        return best, self.initial_seed() if seed is None else seed

    def get_config(self):
        return {**super().get_config(), "num_beams": self.num_beams}


_SAMPLERS = {
    "greedy": GreedySampler,
    "random": RandomSampler,
    "top_k": TopKSampler,
    "top_p": TopPSampler,
    "beam": BeamSampler,
}


def get(identifier):
    """A sampler from a name (`"greedy"`, `"top_k"`, ...) or a `Sampler`.

    Example:
    >>> get("top_k").k
    5
    """
    if isinstance(identifier, Sampler):
        return identifier
    if isinstance(identifier, str):
        if identifier not in _SAMPLERS:
            raise ValueError(
                f"Unknown sampler {identifier!r}. Choose one of "
                f"{sorted(_SAMPLERS)}, or pass a `keras_gemma.samplers.Sampler` "
                "instance such as `TopKSampler(k=10, seed=0)`."
            )
        return _SAMPLERS[identifier]()
    raise TypeError(
        "`sampler` must be a sampler name or a `Sampler` instance. "
        f"Received: {identifier!r} of type {type(identifier).__name__}"
    )
