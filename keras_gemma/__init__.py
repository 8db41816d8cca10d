"""keras_gemma: Google's Gemma models in backend-agnostic Keras 3."""

from keras_gemma import alignment
from keras_gemma import layers
from keras_gemma import samplers
from keras_gemma.alignment import GemmaDPO
from keras_gemma.alignment import GemmaPolicyOptimizer
from keras_gemma.alignment import GemmaRewardModel
from keras_gemma.backbone import GemmaBackbone
from keras_gemma.causal_lm import GemmaCausalLM
from keras_gemma.causal_lm import token_log_probabilities
from keras_gemma.chat import ChatSession
from keras_gemma.chat import format_turns
from keras_gemma.config import GemmaConfig
from keras_gemma.datasets import load_dataset
from keras_gemma.preprocessor import GemmaCausalLMPreprocessor
from keras_gemma.samplers import BeamSampler
from keras_gemma.samplers import GreedySampler
from keras_gemma.samplers import RandomSampler
from keras_gemma.samplers import Sampler
from keras_gemma.samplers import TopKSampler
from keras_gemma.samplers import TopPSampler
from keras_gemma.tokenizer import GemmaTokenizer
from keras_gemma.version import __version__ as __version__

__all__ = [
    "BeamSampler",
    "ChatSession",
    "GemmaBackbone",
    "GemmaCausalLM",
    "GemmaCausalLMPreprocessor",
    "GemmaConfig",
    "GemmaDPO",
    "GemmaPolicyOptimizer",
    "GemmaRewardModel",
    "GemmaTokenizer",
    "GreedySampler",
    "RandomSampler",
    "Sampler",
    "TopKSampler",
    "TopPSampler",
    "alignment",
    "format_turns",
    "layers",
    "load_dataset",
    "samplers",
    "token_log_probabilities",
]
