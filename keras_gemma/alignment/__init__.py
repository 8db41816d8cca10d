"""Alignment after SFT: reward model, policy optimisation (RLOO/GRPO), DPO, callbacks."""

from keras_gemma.alignment.callbacks import AdaptiveKLController
from keras_gemma.alignment.callbacks import GenerateSamples
from keras_gemma.alignment.callbacks import LoRACheckpoint
from keras_gemma.alignment.callbacks import StopOnDivergence
from keras_gemma.alignment.dpo import GemmaDPO
from keras_gemma.alignment.dpo import dpo_loss
from keras_gemma.alignment.policy import ReferencePolicy
from keras_gemma.alignment.policy import adapters_disabled
from keras_gemma.alignment.policy import completion_log_probs
from keras_gemma.alignment.policy import completion_mask
from keras_gemma.alignment.policy import penalize_truncated
from keras_gemma.alignment.policy import score_completions
from keras_gemma.alignment.preferences import check_preferences
from keras_gemma.alignment.reward_model import GemmaRewardModel
from keras_gemma.alignment.reward_model import check_same_tokenizer
from keras_gemma.alignment.rloo import GemmaPolicyOptimizer
from keras_gemma.alignment.rloo import group_normalized_advantages
from keras_gemma.alignment.rloo import leave_one_out_advantages

__all__ = [
    "AdaptiveKLController",
    "GemmaDPO",
    "GemmaPolicyOptimizer",
    "GemmaRewardModel",
    "GenerateSamples",
    "LoRACheckpoint",
    "ReferencePolicy",
    "StopOnDivergence",
    "adapters_disabled",
    "check_preferences",
    "check_same_tokenizer",
    "completion_log_probs",
    "completion_mask",
    "dpo_loss",
    "group_normalized_advantages",
    "leave_one_out_advantages",
    "penalize_truncated",
    "score_completions",
]
