"""Direct preference optimisation (Rafailov et al. 2023), driven by `fit`."""

import contextlib

import keras
from keras import ops

from keras_gemma.alignment.policy import ReferencePolicy
from keras_gemma.alignment.policy import completion_log_probs
from keras_gemma.alignment.policy import score_completions
from keras_gemma.alignment.preferences import PreferenceModel
from keras_gemma.alignment.preferences import check_preferences
from keras_gemma.alignment.preferences import preference_batch

REFERENCE_FIELDS = ("reference_chosen_logps", "reference_rejected_logps")


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.1):
    """`(loss, chosen_rewards, rejected_rewards)` of DPO's sigmoid loss.

    The implicit rewards are `β (log π − log π_ref)` of each completion; the
    loss is `mean(−log σ(chosen_rewards − rejected_rewards))`. Inputs are
    `[batch]` sequence log-probabilities.

    Example:
    >>> import numpy as np
    >>> loss, chosen, rejected = dpo_loss(np.array([-3.0]), np.array([-5.0]),
    ...     np.array([-4.0]), np.array([-4.0]), beta=0.5)
    >>> round(float(loss), 4), float(chosen[0]), float(rejected[0])
    (0.3133, 0.5, -0.5)
    """
    chosen = beta * (ops.cast(policy_chosen, "float32") - ops.cast(reference_chosen, "float32"))
    rejected = beta * (
        ops.cast(policy_rejected, "float32") - ops.cast(reference_rejected, "float32")
    )
    return -ops.mean(ops.log_sigmoid(chosen - rejected)), chosen, rejected


class GemmaDPO(PreferenceModel):
    """Trains a `GemmaCausalLM` policy by DPO on preference pairs.

    `fit` takes the reward model's preference data (`{"prompts", "chosen",
    "rejected"}` or conversations, see `check_preferences`) and minimises
    `−log σ(β[(log π_c − log π_ref,c) − (log π_r − log π_ref,r)])`, where
    `log π` sums the completion's tokens (the response and its `<eos>`, or
    the model turns). It logs TRL's metrics: `rewards/chosen`,
    `rewards/rejected` (the implicit rewards `β (log π − log π_ref)`),
    `rewards/accuracies` (pairs whose chosen reward is higher; 0 at the
    first step, where policy and reference agree), `rewards/margins`,
    `logps/chosen` and `logps/rejected`. Dropout is off in `fit`
    (`disable_dropout`, TRL's default).

    The reference is `keras_gemma.alignment.policy.ReferencePolicy`: with
    LoRA on the policy, the policy itself with its adapters switched off
    (no second copy of the base weights; enable fresh adapters before
    building this); without LoRA, a frozen copy made here (a second set
    of weights). Its log-probabilities are computed in each training step,
    outside the gradient, unless the data carries them:
    `precompute_reference_log_probs(data)` adds `reference_chosen_logps` and
    `reference_rejected_logps` columns (TRL's `precompute_ref_log_probs`), and
    with `reference=None` no copy is made at all.

    Args:
        policy: a `GemmaCausalLM` with a preprocessor (its `sequence_length`
            bounds prompt plus response).
        beta: the KL strength β (TRL's default 0.1).
        reference: `"auto"`, a `ReferencePolicy`, or None (the data must
            carry the reference columns).
        disable_dropout: set dropout rates to 0 while fitting.

    Example:
    >>> import keras
    >>> from keras_gemma import GemmaBackbone, GemmaCausalLM
    >>> from keras_gemma import GemmaCausalLMPreprocessor, GemmaTokenizer
    >>> from keras_gemma.tokenizer import train_sentencepiece
    >>> tokenizer = GemmaTokenizer(train_sentencepiece(["yes no maybe"] * 50, 280))
    >>> backbone = GemmaBackbone(vocabulary_size=tokenizer.vocabulary_size(),
    ...     num_layers=1, num_query_heads=2, num_key_value_heads=1,
    ...     hidden_dim=16, intermediate_dim=32, head_dim=8)
    >>> policy = GemmaCausalLM(backbone, GemmaCausalLMPreprocessor(tokenizer, 8))
    >>> policy.backbone.enable_lora(2)
    >>> dpo = GemmaDPO(policy, beta=0.1)
    >>> dpo.compile(optimizer=keras.optimizers.Adam(1e-2))
    >>> history = dpo.fit({"prompts": ["ok?"] * 2, "chosen": ["yes"] * 2,
    ...     "rejected": ["no"] * 2}, batch_size=2, epochs=2, verbose=0)
    >>> round(history.history["loss"][0], 4)  # log 2: the policy is the reference
    0.6931
    """

    default_learning_rate = 1e-6  # TRL's DPO default

    def __init__(self, policy, beta=0.1, reference="auto", disable_dropout=True, **kwargs):
        super().__init__(dtype=policy.dtype_policy, **kwargs)
        if getattr(policy, "preprocessor", None) is None:
            raise ValueError(
                "DPO tokenizes preference text with the policy's preprocessor; give the "
                "policy one: GemmaCausalLM(backbone, GemmaCausalLMPreprocessor(...))."
            )
        if not beta > 0:
            raise ValueError(f"`beta` must be positive. Received: {beta!r}")
        self.policy = policy
        self.beta = float(beta)
        self.disable_dropout = disable_dropout
        if reference == "auto":
            reference = ReferencePolicy(policy)
        elif reference is not None and not isinstance(reference, ReferencePolicy):
            raise TypeError(
                "`reference` must be 'auto', a ReferencePolicy or None (with precomputed "
                f"reference columns). Received {type(reference).__name__}."
            )
        self.reference = reference
        # A frozen copy is a layer of this model, so compiled training steps
        # take its weights as (non-trainable) state instead of constants.
        copy = reference is not None and reference.model is not policy
        self.reference_model = reference.model if copy else None
        self._trackers = {
            name: keras.metrics.Mean(name=name)
            for name in (
                "rewards/chosen",
                "rewards/rejected",
                "rewards/accuracies",
                "rewards/margins",
                "logps/chosen",
                "logps/rejected",
            )
        }
        self.built = True

    # The computation.

    def _reference_log_probs(self, token_ids, padding_mask, completion_mask):
        if self.reference is None:
            raise ValueError(
                "GemmaDPO(reference=None) reads the reference log-probabilities from the "
                "data: add them with `data = dpo.precompute_reference_log_probs(data)` "
                "before training, or build GemmaDPO with reference='auto'."
            )
        with self.reference.active() as model:
            _, total = completion_log_probs(model, token_ids, padding_mask, completion_mask)
        return ops.stop_gradient(total)

    def call(self, inputs, training=None):
        """`[batch, 4]`: policy chosen, policy rejected, reference chosen,
        reference rejected sequence log-probabilities."""
        # Chosen and rejected in one forward pass.
        token_ids, padding_mask, completion = (
            ops.concatenate([inputs[f"chosen_{k}"], inputs[f"rejected_{k}"]], 0)
            for k in ("token_ids", "padding_mask", "completion_mask")
        )
        _, policy = completion_log_probs(
            self.policy, token_ids, padding_mask, completion, training=training
        )
        if REFERENCE_FIELDS[0] in inputs:
            reference = ops.concatenate([inputs[k] for k in REFERENCE_FIELDS], 0)
        else:
            reference = self._reference_log_probs(token_ids, padding_mask, completion)
        policy, reference = ops.reshape(policy, (2, -1)), ops.reshape(reference, (2, -1))
        return ops.transpose(ops.concatenate([policy, ops.cast(reference, "float32")], 0))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        policy_chosen, policy_rejected = y_pred[:, 0], y_pred[:, 1]
        loss, chosen, rejected = dpo_loss(
            policy_chosen, policy_rejected, y_pred[:, 2], y_pred[:, 3], self.beta
        )
        values = {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/accuracies": ops.cast(chosen > rejected, "float32"),
            "rewards/margins": chosen - rejected,
            "logps/chosen": policy_chosen,
            "logps/rejected": policy_rejected,
        }
        for name, value in values.items():
            self._trackers[name].update_state(value)
        return ops.sum(ops.stack([loss, *map(ops.sum, self.losses)]))

    # Data.

    def _check(self, x):
        data = check_preferences(x, REFERENCE_FIELDS)
        present = [k for k in REFERENCE_FIELDS if k in data]
        if len(present) == 1:
            raise ValueError(
                f"Preference data has {present[0]!r} but not its partner: give both "
                f"{list(REFERENCE_FIELDS)} (from `precompute_reference_log_probs`) or neither."
            )
        if REFERENCE_FIELDS[0] not in data and self.reference is None:
            self._reference_log_probs(None, None, None)  # raises, naming the fix
        return data

    @property
    def trained_backbone(self):
        return self.policy.backbone

    def preprocess(self, batch):
        """A batch of preference data (a dict of lists) as model inputs."""
        return preference_batch(self.policy.preprocessor, self._check(batch), False)

    def precompute_reference_log_probs(self, x, batch_size=32):
        """`x` plus `reference_chosen_logps` and `reference_rejected_logps`.

        Computed by the reference (or, with `reference=None`, by the policy
        as it is now: call this before training), compiled and without
        gradient. Then `fit` needs no reference pass, and no copy of the
        weights when built with `reference=None`.
        """
        data = check_preferences(x, ())
        columns = {k: [] for k in REFERENCE_FIELDS}
        if self.reference is not None:
            context = self.reference.active()
        else:
            context = contextlib.nullcontext(self.policy)
        preprocessor = self.policy.preprocessor
        with context as model:
            for start in range(0, len(data["chosen"]), batch_size):
                rows = {k: v[start : start + batch_size] for k, v in data.items()}
                batch = preference_batch(preprocessor, rows, False)
                for side, key in zip(("chosen", "rejected"), REFERENCE_FIELDS):
                    log_probs, _ = score_completions(
                        model,
                        batch[f"{side}_token_ids"],
                        batch[f"{side}_padding_mask"],
                        batch[f"{side}_completion_mask"],
                    )
                    columns[key] += log_probs.sum(axis=1).astype("float64").tolist()
        return {**data, **columns}

    def get_config(self):
        raise NotImplementedError(
            "GemmaDPO is a training wrapper and is not serialized: save the policy with "
            "`dpo.policy.save_to_preset(...)`."
        )
