"""GemmaRewardModel: a scalar reward from a Gemma backbone, trained on
preference pairs (their data lives in `preferences.py`), and
`check_same_tokenizer`, which keeps a reward model reading its policy's tokens.
"""

import keras
import numpy as np
from keras import ops

from keras_gemma import checkpoints
from keras_gemma import lora
from keras_gemma.alignment.preferences import PreferenceModel
from keras_gemma.alignment.preferences import check_preferences
from keras_gemma.alignment.preferences import pad_examples
from keras_gemma.alignment.preferences import preference_batch
from keras_gemma.backbone import GemmaBackbone
from keras_gemma.preprocessor import GemmaCausalLMPreprocessor
from keras_gemma.presets import PRESETS

HEAD_FILE = "reward_head.safetensors"
_HEAD_FORMAT = "keras_gemma.reward_head"


def check_same_tokenizer(a, b, names=("reward model", "policy")):
    """Raises unless `a` and `b` tokenize identically.

    `a` and `b` may be tokenizers, preprocessors or task models (anything
    with `.preprocessor.tokenizer`). A reward model must read the policy's
    token ids: the same SentencePiece model, not just the same size.

    Example:
    >>> from keras_gemma import GemmaTokenizer
    >>> from keras_gemma.tokenizer import train_sentencepiece
    >>> one = GemmaTokenizer(train_sentencepiece(["the quick fox"] * 50, 280))
    >>> check_same_tokenizer(one, one)
    >>> other = GemmaTokenizer(train_sentencepiece(["a lazy dog"] * 50, 280))
    >>> check_same_tokenizer(one, other)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: The reward model's tokenizer differs from the policy's (same size, 280 \
pieces, but different pieces): ...
    """
    tokenizers = []
    for obj, name in zip((a, b), names):
        tokenizer = getattr(getattr(obj, "preprocessor", obj), "tokenizer", obj)
        if not hasattr(tokenizer, "proto"):
            raise TypeError(
                f"The {name} has no tokenizer to compare (received {type(obj).__name__}); "
                "give it a preprocessor, e.g. from_preset(...)."
            )
        tokenizers.append(tokenizer)
    first, second = tokenizers
    if first.proto == second.proto:
        return
    sizes = first.vocabulary_size(), second.vocabulary_size()
    what = (
        f"same size, {sizes[0]} pieces, but different pieces"
        if sizes[0] == sizes[1]
        else f"{sizes[0]} vs {sizes[1]} pieces"
    )
    raise ValueError(
        f"The {names[0]}'s tokenizer differs from the {names[1]}'s ({what}): the {names[0]} "
        f"would read the {names[1]}'s token ids as other words. Build it from the "
        f"{names[1]}'s preset, e.g. GemmaRewardModel.from_preset(<the {names[1]}'s preset>)."
    )


# The model.


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaRewardModel(PreferenceModel):
    """A Gemma backbone with a scalar reward head, trained on preference pairs.

    The reward is a bias-free `Dense(1)` (float32) of the final hidden state
    at each sequence's last real token. Every text is tokenized as
    supervised fine-tuning does (`<bos>` prompt response) and ends with
    `<eos>`, appended to conversations too, so the reward is read at an end
    token that has seen the whole sequence; the position is found from the
    padding mask, so padding never moves it.

    `fit` takes preference data, `{"prompts", "chosen", "rejected"}` (see
    `check_preferences`; conversations too), and minimises the
    Bradley–Terry loss `-log σ(r_chosen − r_rejected − margin)` with an
    optional per-row `margin` column, plus `center_rewards_coefficient ·
    mean((r_chosen + r_rejected)²)` when set (TRL's reward centring; 0.01 is
    typical). It logs `accuracy` (pairs ranked right), `margin` (mean
    `r_chosen − r_rejected`) and `mean_reward`, TRL's names. Dropout is off
    during `fit` (`disable_dropout=True`, TRL's default).

    `predict({"prompts", "responses"})` (or `{"messages": [...]}`, or
    `{"token_ids", "padding_mask"}`) returns one float32 reward per row;
    `score_tokens` scores generated token rows (appending `<eos>` as training
    does); `compute_rewards(token_ids, padding_mask)` is the `keras.ops` core.
    LoRA: `reward_model.backbone.enable_lora(rank)` freezes the backbone but
    for the adapters; the head always trains. `from_preset` takes any Gemma
    preset (a fresh head) or a saved reward model (its head too).

    Args:
        backbone: a `GemmaBackbone`.
        preprocessor: a `GemmaCausalLMPreprocessor`; its `sequence_length`
            is the longest scored sequence, `<eos>` included.
        center_rewards_coefficient: weight of the reward-centring term, or None.
        disable_dropout: set dropout rates to 0 while fitting.

    Example:
    >>> import keras
    >>> from keras_gemma import GemmaBackbone, GemmaCausalLMPreprocessor, GemmaTokenizer
    >>> from keras_gemma.tokenizer import train_sentencepiece
    >>> tokenizer = GemmaTokenizer(train_sentencepiece(["yes no maybe"] * 50, 280))
    >>> backbone = GemmaBackbone(vocabulary_size=tokenizer.vocabulary_size(),
    ...     num_layers=1, num_query_heads=2, num_key_value_heads=1,
    ...     hidden_dim=16, intermediate_dim=32, head_dim=8)
    >>> model = GemmaRewardModel(backbone, GemmaCausalLMPreprocessor(tokenizer, 8))
    >>> model.compile(optimizer=keras.optimizers.Adam(1e-2))
    >>> history = model.fit({"prompts": ["ok?"] * 4, "chosen": ["yes"] * 4,
    ...     "rejected": ["no"] * 4}, batch_size=4, epochs=2, verbose=0)
    >>> sorted(history.history)
    ['accuracy', 'loss', 'margin', 'mean_reward']
    >>> model.predict({"prompts": ["ok?"], "responses": ["yes"]}, verbose=0).shape
    (1,)
    """

    backbone_cls = GemmaBackbone
    preprocessor_cls = GemmaCausalLMPreprocessor
    presets = PRESETS  # any Gemma preset serves as the backbone

    def __init__(
        self,
        backbone,
        preprocessor=None,
        center_rewards_coefficient=None,
        disable_dropout=True,
        **kwargs,
    ):
        super().__init__(dtype=backbone.dtype_policy, **kwargs)
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.center_rewards_coefficient = center_rewards_coefficient
        self.disable_dropout = disable_dropout
        # transformers' sequence-classification heads: no bias (it cancels in
        # r_chosen − r_rejected), normal(0.02) weights, so rewards start small
        # and the loss near log 2. Float32 whatever the backbone's dtype.
        self.reward_head = keras.layers.Dense(
            1,
            use_bias=False,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.02),
            dtype="float32",
            name="reward_head",
        )
        self.reward_head.build((None, backbone.hidden_dim))
        self._accuracy = keras.metrics.Mean(name="accuracy")
        self._margin = keras.metrics.Mean(name="margin")
        self._mean_reward = keras.metrics.Mean(name="mean_reward")
        self.built = True

    def compute_rewards(self, token_ids, padding_mask, training=None):
        """`[batch]` float32 rewards of right-padded sequences (as the
        preprocessor pads them), read at each row's last real token: found
        from `padding_mask`, so the padding's length never moves it. (Left
        padding would shift Gemma's rotary positions, so it is not used.)"""
        hidden = self.backbone(
            {"token_ids": token_ids, "padding_mask": padding_mask}, training=training
        )  # [batch, sequence, hidden]
        length = ops.shape(hidden)[1]
        positions = ops.arange(length, dtype="int32")[None, :]
        real = ops.cast(padding_mask, "bool")
        last = ops.argmax(ops.where(real, positions, -1), axis=1)  # [batch]
        # A one-hot product selects exactly (x·1 + 0s) and works the same on
        # every backend, unlike gathers with a broadcast batch index.
        selector = ops.one_hot(last, length, dtype=hidden.dtype)  # [batch, sequence]
        final = ops.einsum("bsh,bs->bh", hidden, selector)  # [batch, hidden]
        return self.reward_head(ops.cast(final, "float32"))[:, 0]

    def call(self, inputs, training=None):
        if "chosen_token_ids" not in inputs:
            return self.compute_rewards(inputs["token_ids"], inputs["padding_mask"], training)
        # Chosen and rejected in one forward pass.
        token_ids = ops.concatenate([inputs["chosen_token_ids"], inputs["rejected_token_ids"]], 0)
        padding_mask = ops.concatenate(
            [inputs["chosen_padding_mask"], inputs["rejected_padding_mask"]], 0
        )
        rewards = self.compute_rewards(token_ids, padding_mask, training)  # [2 * batch]
        return ops.transpose(ops.reshape(rewards, (2, -1)))  # [batch, (chosen, rejected)]

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        chosen, rejected = y_pred[:, 0], y_pred[:, 1]
        margin = x.get("margin") if isinstance(x, dict) else None
        difference = chosen - rejected
        target = difference if margin is None else difference - ops.cast(margin, "float32")
        loss = -ops.mean(ops.log_sigmoid(target))
        if self.center_rewards_coefficient:
            loss = loss + self.center_rewards_coefficient * ops.mean(ops.square(chosen + rejected))
        self._accuracy.update_state(ops.cast(difference > 0, "float32"))
        self._margin.update_state(difference)
        self._mean_reward.update_state(ops.concatenate([chosen, rejected], 0))
        return ops.sum(ops.stack([loss, *map(ops.sum, self.losses)]))

    # Data.

    def _require_preprocessor(self, what):
        if self.preprocessor is None:
            raise ValueError(
                f"This reward model has no preprocessor, so {what} takes token arrays, not "
                "text. Attach one: GemmaRewardModel(backbone, preprocessor=...)."
            )

    @property
    def trained_backbone(self):
        return self.backbone

    def _check(self, x):
        self._require_preprocessor("`fit`")
        return check_preferences(x, ("margin",))

    def preprocess(self, batch):
        """A batch of preference data (a dict of lists) as model inputs."""
        return preference_batch(self.preprocessor, self._check(batch))

    def preprocess_responses(self, x, sequence_length=None):
        """`{"prompts", "responses"}`, `{"messages"}` or a list of texts as
        `{"token_ids", "padding_mask"}`, each row ending with `<eos>`."""
        self._require_preprocessor("`predict`")
        if isinstance(x, dict) and set(x) not in ({"prompts", "responses"}, {"messages"}):
            raise ValueError(
                "Rewards are predicted for {'prompts', 'responses'}, {'messages'}, a list "
                f"of texts or {{'token_ids', 'padding_mask'}}. Received keys {sorted(x)}."
            )
        # The preprocessor checks the texts and tokenizes them as SFT does.
        examples = self.preprocessor.tokenize_examples(x)
        tokenizer = self.preprocessor.tokenizer
        token_ids, padding_mask, _ = pad_examples(
            examples,
            sequence_length or self.preprocessor.sequence_length,
            tokenizer.pad_token_id,
            tokenizer.end_token_id,
        )
        return {"token_ids": token_ids, "padding_mask": padding_mask}

    def predict(self, x, batch_size=None, **kwargs):
        """One float32 reward per row of `{"prompts", "responses"}`,
        `{"messages"}`, a list of texts, or `{"token_ids", "padding_mask"}`."""
        if not (isinstance(x, dict) and "token_ids" in x):
            x = self.preprocess_responses(x)
        return super().predict(x, batch_size=batch_size or 32, **kwargs)

    def score_tokens(self, token_ids, padding_mask, batch_size=32):
        """Rewards of token rows as generation returns them: NumPy float32 `[batch]`.

        Rows are right-padded prompt + completion ids (e.g. `generate`'s
        output). As in training, the reward is read at an `<eos>` after the
        last real token: it is appended where a row does not end with one
        (a completion stopped at `<end_of_turn>`, or truncated), so rewards
        match `predict` on the same text without decoding and re-tokenizing.
        """
        self._require_preprocessor("`score_tokens`")
        end = self.preprocessor.tokenizer.end_token_id
        token_ids = np.asarray(ops.convert_to_numpy(token_ids)).astype("int32")
        padding_mask = np.asarray(ops.convert_to_numpy(padding_mask)).astype("int32")
        lengths = padding_mask.sum(axis=1)
        rows = np.arange(len(token_ids))
        needs_end = token_ids[rows, np.maximum(lengths - 1, 0)] != end
        if needs_end.any() and lengths[needs_end].max() >= token_ids.shape[1]:
            token_ids = np.pad(token_ids, ((0, 0), (0, 1)))
            padding_mask = np.pad(padding_mask, ((0, 0), (0, 1)))
        token_ids, padding_mask = token_ids.copy(), padding_mask.copy()
        token_ids[rows[needs_end], lengths[needs_end]] = end
        padding_mask[rows[needs_end], lengths[needs_end]] = 1
        inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
        return super().predict(inputs, batch_size=batch_size, verbose=0)

    # Presets.

    @classmethod
    def from_preset(cls, preset, load_weights=True, dtype=None, **kwargs):
        """A reward model on any Gemma preset's backbone and tokenizer.

        A preset saved by `save_to_preset` brings its trained head; any
        other preset gets a fresh one. Arguments as `GemmaCausalLM.from_preset`
        (`sequence_length`, backbone overrides such as `dropout`).
        """
        model = checkpoints.load_causal_lm(cls, preset, load_weights, dtype, **kwargs)
        head = checkpoints.resolve_preset(preset) / HEAD_FILE
        if load_weights and head.is_file():
            model.load_reward_head(head)
        return model

    def save_to_preset(self, preset_dir):
        """Writes the backbone and preprocessor as a Keras preset (which
        `GemmaCausalLM.from_preset` also reads) plus the reward head, atomically."""
        if lora.lora_state(self.backbone) is not None:
            raise ValueError(
                "The backbone has LoRA adapters, which a preset does not hold. Call "
                "`reward_model.backbone.merge_lora()` before saving (or save the adapters "
                "with `backbone.save_lora_weights(path)` and the head with "
                "`save_reward_head(path)`)."
            )
        with checkpoints.atomic_directory(preset_dir) as temporary:
            # Writes into the (empty) temporary directory, itself atomically.
            checkpoints.save_causal_lm(self, temporary)
            self.save_reward_head(temporary / HEAD_FILE)

    def save_reward_head(self, path):
        """Writes the head's kernel to a safetensors file (atomically)."""
        kernel = np.asarray(ops.convert_to_numpy(self.reward_head.kernel), "float32")
        checkpoints.save_arrays(
            path, {"kernel": kernel}, {"format": _HEAD_FORMAT, "format_version": "1"}
        )

    def load_reward_head(self, path):
        """Reads a head written by `save_reward_head`, checking its shape."""
        file = checkpoints.SafetensorsFile(path)
        if file.metadata.get("format") != _HEAD_FORMAT or "kernel" not in file.tensors:
            raise checkpoints.CheckpointError(f"{path} is not a keras_gemma reward head.")
        expected = tuple(self.reward_head.kernel.shape)
        if file.shape("kernel") != expected:
            raise checkpoints.CheckpointError(
                f"The reward head in {path} has shape {file.shape('kernel')}, but this "
                f"backbone needs {expected}: it was trained on another model."
            )
        self.reward_head.kernel.assign(file.read("kernel"))

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "preprocessor": keras.saving.serialize_keras_object(self.preprocessor),
            "center_rewards_coefficient": self.center_rewards_coefficient,
            "disable_dropout": self.disable_dropout,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        if config.get("preprocessor") is not None:
            config["preprocessor"] = keras.saving.deserialize_keras_object(config["preprocessor"])
        return cls(**config)
