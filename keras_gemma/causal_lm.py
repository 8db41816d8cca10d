"""GemmaCausalLM: logits, fit on text, generate, score."""

import warnings

import keras
import numpy as np
from keras import ops

from keras_gemma import checkpoints
from keras_gemma import internals
from keras_gemma import lora
from keras_gemma import samplers as samplers_lib
from keras_gemma.backbone import GemmaBackbone
from keras_gemma.data import adapt_fit_inputs
from keras_gemma.generation import Generator
from keras_gemma.generation import check_token_ids
from keras_gemma.layers.projection import quantization_config
from keras_gemma.losses import chunked_cross_entropy
from keras_gemma.losses import take_labels
from keras_gemma.preprocessor import GemmaCausalLMPreprocessor
from keras_gemma.preprocessor import as_string_list
from keras_gemma.presets import PRESETS


def token_log_probabilities(logits, target_ids):
    """`log p(target_ids[b, t])` under `logits[b, t]`, in float32.

    Differentiable, in `keras.ops`: the building block of scoring, policy
    gradients and KL penalties.

    Example:
    >>> import numpy as np
    >>> logits = np.log(np.array([[[0.25, 0.75]]], "float32"))
    >>> round(float(token_log_probabilities(logits, np.array([[1]]))[0, 0]), 4)
    -0.2877
    """
    return take_labels(ops.log_softmax(ops.cast(logits, "float32"), axis=-1), target_ids)


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaCausalLM(keras.Model):
    """A Gemma language model: backbone plus the tied output projection.

    Calling the model returns float32 next-token logits. With a
    `preprocessor`, `fit`, `evaluate` and `generate` take raw strings (or
    `{"prompts", "responses"}` dicts for supervised fine-tuning); without one
    they take `{"token_ids", "padding_mask"}` arrays.

    Args:
        backbone: a `GemmaBackbone`.
        preprocessor: an optional `GemmaCausalLMPreprocessor`.

    Example:
    >>> from keras_gemma import GemmaBackbone, GemmaCausalLM
    >>> from keras_gemma import GemmaCausalLMPreprocessor, GemmaTokenizer
    >>> from keras_gemma.tokenizer import train_sentencepiece
    >>> tokenizer = GemmaTokenizer(train_sentencepiece(["the quick fox"] * 50, 280))
    >>> backbone = GemmaBackbone(vocabulary_size=tokenizer.vocabulary_size(),
    ...     num_layers=1, num_query_heads=2, num_key_value_heads=1,
    ...     hidden_dim=16, intermediate_dim=32, head_dim=8)
    >>> lm = GemmaCausalLM(backbone, GemmaCausalLMPreprocessor(tokenizer, 16))
    >>> history = lm.fit(["the quick fox"] * 4, batch_size=2, verbose=0)
    >>> isinstance(lm.generate("the", max_length=8), str)
    True
    """

    def __init__(self, backbone, preprocessor=None, **kwargs):
        super().__init__(dtype=backbone.dtype_policy, **kwargs)
        internals.default_quantization_config(self, quantization_config)
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.sampler = samplers_lib.get("greedy")
        self.generator = Generator(self)  # the generation engine (`generation.Generator`)
        self._loss_from_hidden = self._outputs_hidden = False
        self.loss_chunk_size = None  # positions per logits chunk; None: by memory
        self._accuracy = keras.metrics.Mean(name="accuracy")
        self.built = True

    def call(self, inputs, training=None):
        hidden = self.backbone(inputs, training=training)
        # Inside `fit`/`evaluate` with the default loss, the loss applies the
        # tied projection itself, a chunk at a time (`compute_loss`).
        return hidden if self._outputs_hidden else self.compute_logits(hidden)

    def compute_logits(self, hidden_states):
        """Tied output projection, in float32 for a stable softmax and loss."""
        logits = self.backbone.token_embedding(hidden_states, reverse=True)
        return ops.cast(logits, "float32")

    def compile(
        self,
        optimizer="auto",
        loss="auto",
        *,
        weighted_metrics="auto",
        sampler="greedy",
        **kwargs,
    ):
        """`keras.Model.compile` with defaults for fine-tuning a causal LM.

        `"auto"` gives AdamW (learning rate 5e-5, weight decay 0.01, none on
        norm scales) and the token-mean cross-entropy weighted by the
        preprocessor's sample weights (padding and prompts never dilute it),
        with token accuracy. That loss makes the logits a chunk of positions
        at a time (`losses.chunked_cross_entropy`, `loss_chunk_size`), so a
        256k vocabulary never holds `[batch, sequence, vocabulary]` logits.
        With your own `loss` or metrics, the model outputs full logits.
        `sampler` is what `generate` uses: a name or a `Sampler`.
        """
        if optimizer == "auto":
            optimizer = keras.optimizers.AdamW(learning_rate=5e-5, weight_decay=0.01)
            optimizer.exclude_from_weight_decay(var_names=["scale"])
        self._loss_from_hidden = loss == "auto" and weighted_metrics == "auto"
        if self._loss_from_hidden:
            loss = weighted_metrics = None
        if loss == "auto":
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if weighted_metrics == "auto":
            weighted_metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        super().compile(optimizer=optimizer, loss=loss, weighted_metrics=weighted_metrics, **kwargs)
        self.sampler = samplers_lib.get(sampler)
        self.generator.clear()

    def quantize(self, mode=None, **kwargs):
        """Quantizes the backbone's weights (e.g. `"int8"`, weight-only); see
        `GemmaBackbone.quantize`."""
        self.backbone.quantize(mode, **kwargs)

    def _warn_if_updates_vanish(self):
        low_precision = any(
            keras.backend.standardize_dtype(v.dtype) in ("bfloat16", "float16")
            for v in self.trainable_variables
        )
        if low_precision and hasattr(self.optimizer, "beta_2"):
            warnings.warn(
                "This model trains weights stored in bfloat16/float16. Adam-style "
                "optimizers make no update at all there (Keras rounds beta_2=0.999 "
                "to 1.0 in bfloat16) and small updates round away. For fine-tuning "
                "use dtype='mixed_bfloat16' (float32 weights, bfloat16 compute), or "
                "LoRA on a float32/mixed model.",
                stacklevel=3,  # the user's `fit` call
            )

    def _ensure_compiled(self):
        if not self.compiled:
            self.compile()

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if not self._loss_from_hidden:
            return super().compute_loss(x, y, y_pred, sample_weight, training=training)
        # Outside `fit`/`evaluate`/`*_on_batch` (a custom loop), `y_pred` is
        # already the logits: the same loss, without chunking.
        project = self.compute_logits if self._outputs_hidden else (lambda logits: logits)
        loss, correct = chunked_cross_entropy(
            project, y_pred, y, sample_weight, self.loss_chunk_size, self.backbone.vocabulary_size
        )
        if sample_weight is None:
            count = ops.cast(ops.size(y), "float32")
        else:
            count = ops.sum(ops.cast(sample_weight, "float32"))
        count = ops.maximum(count, 1.0)
        self._accuracy.update_state(correct / count, sample_weight=count)
        return ops.sum(ops.stack([loss / count, *map(ops.sum, self.losses)]))

    def _run_outputting_hidden(self, method, *args, **kwargs):
        # Restores the previous value: `fit` calls `evaluate` for validation.
        previous, self._outputs_hidden = self._outputs_hidden, self._loss_from_hidden
        try:
            return method(*args, **kwargs)
        finally:
            self._outputs_hidden = previous

    # Training and evaluation take raw text through the preprocessor.

    def fit(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        self._ensure_compiled()
        self._warn_if_updates_vanish()
        lora.check_trainable_through_int8(self.backbone)
        x, y, sample_weight, batch_size = adapt_fit_inputs(
            self.preprocessor, x, y, sample_weight, batch_size, kwargs.get("shuffle", True)
        )
        if "validation_data" in kwargs and kwargs["validation_data"] is not None:
            vx, vy, vsw, _ = adapt_fit_inputs(
                self.preprocessor, kwargs["validation_data"], None, None, batch_size, False
            )
            kwargs["validation_data"] = vx if vy is None else (vx, vy, vsw)
        return self._run_outputting_hidden(
            super().fit, x, y, batch_size=batch_size, sample_weight=sample_weight, **kwargs
        )

    def train_on_batch(self, *args, **kwargs):
        self._ensure_compiled()
        return self._run_outputting_hidden(super().train_on_batch, *args, **kwargs)

    def test_on_batch(self, *args, **kwargs):
        self._ensure_compiled()
        return self._run_outputting_hidden(super().test_on_batch, *args, **kwargs)

    def evaluate(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        self._ensure_compiled()
        x, y, sample_weight, batch_size = adapt_fit_inputs(
            self.preprocessor, x, y, sample_weight, batch_size, False
        )
        return self._run_outputting_hidden(
            super().evaluate, x, y, batch_size=batch_size, sample_weight=sample_weight, **kwargs
        )

    # Generation.

    def resolve_stop_token_ids(self, stop_token_ids):
        """`generate`'s `stop_token_ids` argument as a checked tuple of ids."""
        if isinstance(stop_token_ids, str) and stop_token_ids == "auto":
            if self.preprocessor is None:
                raise ValueError(
                    "stop_token_ids='auto' needs a preprocessor to know the end "
                    "tokens; pass explicit ids (e.g. stop_token_ids=[1]) or None."
                )
            tokenizer = self.preprocessor.tokenizer
            ids = [tokenizer.end_token_id, tokenizer.end_of_turn_id]
            return tuple(i for i in ids if i is not None)
        if stop_token_ids is None:
            return ()
        if isinstance(stop_token_ids, str):
            raise ValueError(
                f"`stop_token_ids` must be 'auto', None or token ids. Received {stop_token_ids!r}."
            )
        ids = tuple(int(i) for i in np.asarray(stop_token_ids).reshape(-1))
        vocabulary_size = self.backbone.vocabulary_size
        if any(not 0 <= i < vocabulary_size for i in ids):
            raise ValueError(f"`stop_token_ids` must be in [0, {vocabulary_size}). Received {ids}.")
        return ids

    def compute_step_logits(self, hidden):
        """`compute_logits` of one position, `[batch, hidden]` -> `[batch, vocab]`.

        Written `embeddings @ hidden`: for `hidden @ transpose(embeddings)`,
        XLA's CPU compiler writes out the transposed table in every decode
        step instead of calling its matrix-vector kernel.
        """
        embedding = self.backbone.token_embedding
        if embedding.quantization_mode is not None:
            return self.compute_logits(hidden[:, None])[:, 0]
        dtype = embedding.compute_dtype
        embeddings, hidden = ops.cast(embedding.embeddings, dtype), ops.cast(hidden, dtype)
        return ops.cast(ops.einsum("vd,bd->bv", embeddings, hidden), "float32")

    def generate_tokens(self, token_ids, padding_mask, stop_token_ids=()):
        """Generates into the padding of right-padded `token_ids`.

        Returns `{"token_ids", "padding_mask"}` as NumPy arrays; the mask
        covers the prompt and generated tokens up to the first stop token.
        """
        output, prompt_lengths, max_length = self.generator.generate(
            token_ids, padding_mask, stop_token_ids
        )
        # Keep tokens up to and including each row's first generated stop.
        generated = np.arange(max_length)[None, :] >= prompt_lengths[:, None]
        is_stop = np.isin(output, stop_token_ids) & generated
        after_stop = (np.cumsum(is_stop, axis=1) - is_stop) > 0
        return {"token_ids": output, "padding_mask": (~after_stop).astype("int32")}

    def generate_stream(self, inputs, max_length=None, stop_token_ids="auto"):
        """Yields the text of one prompt piece by piece as it is decoded.

        Same arguments as `generate` for a single prompt string. Each step is
        one compiled call, so the pieces arrive as fast as tokens are made;
        a piece is held back while it ends in an incomplete UTF-8 character.

        Example:
            for piece in lm.generate_stream("Tell me a story", max_length=64):
                print(piece, end="", flush=True)
        """
        stop_token_ids = self.resolve_stop_token_ids(stop_token_ids)
        if self.preprocessor is None:
            raise ValueError("`generate_stream` takes text, so it needs a preprocessor.")
        if not isinstance(inputs, str):
            raise TypeError(
                "`generate_stream` takes one prompt string; for a batch use `generate`. "
                f"Received: {type(inputs).__name__}"
            )
        batch = self.preprocessor.generate_preprocess([inputs], sequence_length=max_length)
        tokenizer = self.preprocessor.tokenizer
        special = {tokenizer.pad_token_id, tokenizer.start_token_id, tokenizer.end_token_id}
        generated, emitted = [], ""
        for token in self.generator.stream(batch["token_ids"], batch["padding_mask"]):
            if token in stop_token_ids:
                break
            if token in special:
                continue
            generated.append(token)
            text = tokenizer.detokenize(generated)
            # Hold back a piece ending in half a UTF-8 character (a byte
            # token) until its other bytes arrive.
            if not text.endswith("\ufffd") and len(text) > len(emitted):
                yield text[len(emitted) :]
                emitted = text
        text = tokenizer.detokenize(generated)
        if len(text) > len(emitted):
            yield text[len(emitted) :]

    def generate(self, inputs, max_length=None, stop_token_ids="auto", strip_prompt=False):
        """Generates text (or tokens) from prompts.

        Args:
            inputs: a prompt string or a list of them (with a preprocessor),
                or a `{"token_ids", "padding_mask"}` dict of right-padded
                prompts whose width is the total length to generate to.
            max_length: total length, prompt included, in tokens; defaults to
                the preprocessor's `sequence_length`.
            stop_token_ids: `"auto"` (`<eos>`, and `<end_of_turn>` when the
                vocabulary has it), a list of ids, or None to never stop early.
            strip_prompt: return only the generated text.

        Returns:
            A string for a string prompt, a list for a list, or a token dict.
        """
        stop_token_ids = self.resolve_stop_token_ids(stop_token_ids)
        if isinstance(inputs, dict):
            missing = {"token_ids", "padding_mask"} - set(inputs)
            if missing:
                raise ValueError(
                    "Token inputs must be a dict with 'token_ids' and "
                    f"'padding_mask'; missing {sorted(missing)}."
                )
            outputs = self.generate_tokens(
                inputs["token_ids"], inputs["padding_mask"], stop_token_ids
            )
            if strip_prompt:
                mask = np.asarray(ops.convert_to_numpy(inputs["padding_mask"])).astype(bool)
                outputs["padding_mask"] = outputs["padding_mask"] * ~mask
            return outputs
        if self.preprocessor is None:
            raise ValueError(
                "This model has no preprocessor, so `generate` takes a dict of "
                "'token_ids' and 'padding_mask', not text. Attach one with "
                "GemmaCausalLM(backbone, preprocessor=...)."
            )
        prompts, single = as_string_list(inputs, "The prompts")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            raise ValueError(f"`max_length` must be an integer >= 2. Received: {max_length!r}")
        batch = self.preprocessor.generate_preprocess(prompts, sequence_length=max_length)
        outputs = self.generate_tokens(batch["token_ids"], batch["padding_mask"], stop_token_ids)
        strip_lengths = batch["padding_mask"].sum(axis=1) if strip_prompt else None
        texts = self.preprocessor.generate_postprocess(
            outputs, skip_tokens=stop_token_ids, strip_lengths=strip_lengths
        )
        return texts[0] if single else texts

    # Scoring.

    def score(self, token_ids, padding_mask=None, scoring_mode="logits", target_ids=None):
        """Scores given sequences in one forward pass.

        Args:
            token_ids: `[batch, sequence]` ids.
            padding_mask: optional `[batch, sequence]`, 1 on real tokens.
            scoring_mode: `"logits"` (`[batch, sequence, vocab]`), `"loss"`
                (per-token cross-entropy against `target_ids`, required) or
                `"log_probs"`: `[batch, sequence]` log-probability of each
                target, where targets default to the next token
                (`token_ids[:, t + 1]`); positions without a real target
                score 0.
            target_ids: optional `[batch, sequence]` targets.

        Returns:
            A backend tensor.
        """
        modes = ("logits", "loss", "log_probs")
        if scoring_mode not in modes:
            raise ValueError(f"`scoring_mode` must be one of {modes}. Received {scoring_mode!r}")
        token_ids = check_token_ids(token_ids, self.backbone.vocabulary_size)
        if padding_mask is None:
            padding_mask = np.ones_like(token_ids)
        padding_mask = np.asarray(ops.convert_to_numpy(padding_mask)).astype("int32")
        logits = self({"token_ids": token_ids, "padding_mask": padding_mask})
        if scoring_mode == "logits":
            return logits
        if target_ids is None:
            if scoring_mode == "loss":
                raise ValueError("scoring_mode='loss' needs `target_ids`.")
            target_ids = np.zeros_like(token_ids)
            target_ids[:, :-1] = token_ids[:, 1:]
            valid = np.zeros_like(padding_mask)
            valid[:, :-1] = padding_mask[:, 1:] * padding_mask[:, :-1]
        else:
            target_ids = check_token_ids(target_ids, self.backbone.vocabulary_size)
            valid = padding_mask
        log_probabilities = token_log_probabilities(logits, target_ids)
        log_probabilities = log_probabilities * ops.cast(valid, "float32")
        return -log_probabilities if scoring_mode == "loss" else log_probabilities

    # Presets: `keras_gemma.checkpoints` does the work.

    presets = PRESETS  # read-only {name: metadata} of the Gemma 1 presets
    # The classes `from_preset` builds, named as keras-hub names them.
    backbone_cls = GemmaBackbone
    preprocessor_cls = GemmaCausalLMPreprocessor

    @classmethod
    def from_preset(cls, preset, load_weights=True, dtype=None, **kwargs):
        """Loads a model and its preprocessor from a preset.

        Args:
            preset: a name from `GemmaCausalLM.presets`, `kaggle://...`,
                `hf://...`, or a local directory in keras-hub's Kaggle layout
                or Hugging Face's (detected automatically).
            load_weights: `False` builds fresh weights, offline.
            dtype: the backbone dtype, e.g. `"bfloat16"`; default: the dtype the
                preset was saved in.
            **kwargs: `sequence_length` for the preprocessor; others
                override the backbone config (e.g. `dropout`).
        """
        return checkpoints.load_causal_lm(cls, preset, load_weights, dtype, **kwargs)

    def save_to_preset(self, preset_dir):
        """Writes keras-hub's Keras preset layout, atomically; keras-hub loads it too."""
        lora.check_merged_before_saving(self.backbone)
        checkpoints.save_causal_lm(self, preset_dir)

    def export_to_huggingface(self, directory):
        """Writes a Hugging Face checkpoint (safetensors, config.json, tokenizer.model)."""
        lora.check_merged_before_saving(self.backbone)
        checkpoints.export_huggingface(self, directory)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "preprocessor": keras.saving.serialize_keras_object(self.preprocessor),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        if config.get("preprocessor") is not None:
            config["preprocessor"] = keras.saving.deserialize_keras_object(config["preprocessor"])
        return cls(**config)
