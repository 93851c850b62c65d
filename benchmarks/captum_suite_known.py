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

KNOWN: list[tuple[str, str, str, str]] = [
    ("", r"has no attribute 'multiplies_by_inputs'", GAP,
     "no multiplies_by_inputs property (Captum: Saliency False, LayerActivation True, ...; item 2)"),
    ("", r"has no attribute 'compute_convergence_delta'", GAP,
     "no compute_convergence_delta(...) on IntegratedGradients / GradientShap (item 2)"),
    ("", r"unexpected keyword argument 'grad_kwargs'", GAP,
     "LayerIntegratedGradients.attribute takes no grad_kwargs (item 2)"),
    ("", r"NoiseTunnel wraps fastattr's", GAP,
     "NoiseTunnel refuses Captum methods fastattr does not implement (FeatureAblation, DeepLift, GuidedBackprop, "
     "Deconvolution, LRP): item 2's generic path"),
    ("test_futures_not_implemented", r"has no attribute 'attribute_future'", GAP,
     "no attribute_future (Captum's public method; for these classes it raises NotImplementedError)"),
    ("test_sensitivity.py::Test::test_convnet_multi_target", r"view size is not compatible", GAP,
     "CPU channels-last layout breaks BasicModel_ConvNet's x.view(...) flatten (item 1)"),
    ("test_input_layer_wrapper.py", r"has no attribute '__wrapped__'", INTERNALS,
     "reads attribute.__wrapped__, set by Captum's @log_usage decorator, to list the undecorated arguments "
     "(with __wrapped__ set on fastattr's attribute the file passes 9/9)"),
    ("test_llm_attr.py", r"LLMGradientAttribution does not support", INTERNALS,
     "Captum's LLMGradientAttribution asserts isinstance(method, its SUPPORTED_METHODS), Captum's own classes"),
]  # fmt: skip
