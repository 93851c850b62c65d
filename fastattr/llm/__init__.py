"""Attribution for language-model generations (Captum's LLMGradientAttribution, batched, sharing forwards).

api.py: the class and its result types; text.py: prompts, targets, baselines, token labels and
generation; batching.py: the padded prompt + continuation layout; model.py: how the model is
called; shared.py: the engine (one forward per path point for every generated token).
"""

from .api import LLMAttributionResult, LLMBatchResult, LLMGradientAttribution

__all__ = ["LLMAttributionResult", "LLMBatchResult", "LLMGradientAttribution"]
