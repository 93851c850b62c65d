"""Classified failures of Captum's tests with fastattr substituted (read by captum_suite.py).

Each entry: (regex on the pytest node id, regex on the failure's exception line, category, reason).
Both must match, so a test that starts failing for another reason shows up as "unclassified".
"captum-internals": the test inspects Captum's internals (a decorator's attributes, isinstance on
Captum's own base classes), so no drop-in can pass it as written. "fastattr-gap": fastattr lacks
something the test uses (issue 14 names the item). A pattern that matches no failure is reported
as stale: remove it once its gap is closed.
"""

from __future__ import annotations

GAP, INTERNALS = "fastattr-gap", "captum-internals"

# The gaps of 2026-11-28 (multiplies_by_inputs, compute_convergence_delta, grad_kwargs, NoiseTunnel over
# Captum methods, attribute_future, channels-last and x.view, attribute.__wrapped__) are closed: removed.
KNOWN: list[tuple[str, str, str, str]] = [
    ("test_llm_attr.py", r"LLMGradientAttribution does not support", INTERNALS,
     "Captum's LLMGradientAttribution asserts isinstance(method, its SUPPORTED_METHODS), Captum's own classes "
     "(with --extra LLMGradientAttribution, fastattr's LLMGradientAttribution passes the test)"),
    ("test_llm_attr.py", r"LLMGradientAttribution supports fastattr's LayerIntegratedGradients and LayerGradientXActivation, got LayerGradientShap",
     GAP, "--extra LLMGradientAttribution only: fastattr has no LayerGradientShap to drive LLMGradientAttribution with"),
]  # fmt: skip
