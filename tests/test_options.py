"""One implementation of the shared surface: one options object, one attribute(), one check.

fastattr's keyword options are one frozen ``Options`` parsed in one place; every class gets
``attribute()`` from the base class (fastattr/attribution.py) formatting its ``attribute_batch``;
invalid option values raise ``OptionError`` and invalid inputs ``AttributionInputError`` (also
an ``AssertionError``, as Captum's); the random-copy helpers have their own module.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import typing

import pytest
import torch
from models import CallCounter

import fastattr
from fastattr.errors import AttributionInputError, FastattrError, OptionError
from fastattr.options import Options, OptionsDict

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("single_thread")]

SRC = pathlib.Path(fastattr.__file__).parent
METHOD_MODULES = ("methods.py", "layer_methods.py", "gradient_shap.py", "noise_tunnel.py", "activations.py")
SHARED_KEYWORDS = {"precision", "memory_budget", "allow_nonfinite", "kernel_backend", "channels_last", "tolerance", "max_steps", "abs_tolerance", "min_steps"}


def _tree(name: str) -> ast.Module:
    return ast.parse((SRC / name).read_text())


def test_the_keyword_list_is_written_once():
    """No method of the attribution classes spells out the shared keywords: they are Options fields."""
    for name in METHOD_MODULES:
        for cls in (n for n in ast.walk(_tree(name)) if isinstance(n, ast.ClassDef)):
            for node in (f for f in cls.body if isinstance(f, ast.FunctionDef)):
                params = {a.arg for a in (*node.args.args, *node.args.kwonlyargs)}
                assert not params & SHARED_KEYWORDS, (name, cls.name, node.name, params & SHARED_KEYWORDS)
    assert {f.name for f in dataclasses.fields(Options)} | {"options"} == set(typing.get_type_hints(OptionsDict))


def test_one_attribute_in_the_base_class():
    for name in METHOD_MODULES:
        for cls in (n for n in ast.walk(_tree(name)) if isinstance(n, ast.ClassDef)):
            defs = {f.name for f in cls.body if isinstance(f, ast.FunctionDef)}
            assert "attribute" not in defs, f"{name}: {cls.name} defines its own attribute()"
    for cls in (fastattr.Saliency, fastattr.InputXGradient, fastattr.IntegratedGradients, fastattr.GradientShap, fastattr.NoiseTunnel, fastattr.LayerIntegratedGradients, fastattr.LayerActivation):
        assert cls.attribute.__qualname__ == f"{cls.__name__}.attribute" and cls.attribute.__doc__


def test_no_import_cycle_between_gradient_shap_and_noise_tunnel():
    def imports(name: str) -> set[str]:
        out = set()
        for node in ast.walk(_tree(name)):
            if isinstance(node, ast.ImportFrom):
                out.add(node.module or "")
        return out

    assert "noise_tunnel" not in imports("gradient_shap.py")
    assert "gradient_shap" not in imports("noise_tunnel.py")
    names = {n.id for n in ast.walk(_tree("noise_tunnel.py")) if isinstance(n, ast.Name)}
    assert not names & {"GradientShap", "Saliency", "IntegratedGradients"}  # class attributes, not isinstance checks


def test_options_object_is_frozen_validated_and_overridable():
    assert fastattr.Options is Options
    opts = Options(precision="bf16", max_rows=8, memory_budget="1KiB")
    assert opts.memory_budget == 1024 and opts.policy.name == "bf16"
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.precision = "fp32"  # type: ignore[misc]
    model = fastattr.IntegratedGradients(torch.nn.Linear(4, 3))
    x = torch.randn(5, 4)
    a = model.attribute(x, target=1, options=Options(max_rows=3))
    b = model.attribute(x, target=1, options=Options(max_rows=3, precision="fp16"), precision="fp32")  # the keyword wins
    torch.testing.assert_close(a, b)
    with pytest.raises(OptionError, match="options must be a fastattr.Options"):
        model.attribute(x, target=1, options={"max_rows": 3})


POSITIVE = [  # (call with a count v, its name): every count goes through fastattr.options.positive_int
    (lambda m, x, v: fastattr.IntegratedGradients(m).attribute(x, target=0, n_steps=v), "n_steps"),
    (lambda m, x, v: fastattr.IntegratedGradients(m).attribute(x, target=0, internal_batch_size=v), "internal_batch_size"),
    (lambda m, x, v: fastattr.Saliency(m).attribute(x, target=0, max_rows=v), "max_rows"),
    (lambda m, x, v: fastattr.LayerActivation(m, m.inner.net[0]).attribute(x, max_rows=v), "max_rows"),
    (lambda m, x, v: fastattr.LayerIntegratedGradients(m, m.inner.net[0]).attribute(x, target=0, n_steps=v), "n_steps"),
    (lambda m, x, v: fastattr.GradientShap(m).attribute(x, torch.zeros(2, 12), n_samples=v, target=0), "n_samples"),
    (lambda m, x, v: fastattr.GradientShap(m).attribute(x, torch.zeros(2, 12), target=0, n_samples_batch_size=v), "n_samples_batch_size"),
    (lambda m, x, v: fastattr.NoiseTunnel(fastattr.Saliency(m)).attribute(x, target=0, nt_samples=v), "nt_samples"),
    (lambda m, x, v: fastattr.NoiseTunnel(fastattr.Saliency(m)).attribute(x, target=0, nt_samples_batch_size=v), "nt_samples_batch_size"),
]


@pytest.mark.parametrize("value", [0, -2, 2.5, True, "3"])
@pytest.mark.parametrize("case", range(len(POSITIVE)))
def test_one_positive_int_check(case, value):
    call, name = POSITIVE[case]
    model = CallCounter()
    with pytest.raises(OptionError) as info:
        call(model, torch.randn(2, 12), value)
    message = str(info.value)  # n_steps also names its other form, 'auto'
    assert message.startswith(f"{name} must be a positive int") and message.endswith(f", got {value!r}"), message
    assert model.calls == 0


def test_option_errors_and_input_errors_are_told_apart():
    model, x = CallCounter(), torch.randn(2, 12)
    ig = fastattr.IntegratedGradients(model)
    for kw in ({"precision": "fp8"}, {"method": "simpson"}, {"memory_budget": "lots"}, {"kernel_backend": "cuda"}, {"channels_last": "yes"}, {"n_steps": "auto", "tolerance": -1.0}):
        with pytest.raises(OptionError) as info:
            ig.attribute(x, target=0, **kw)
        assert isinstance(info.value, ValueError) and isinstance(info.value, FastattrError) and not isinstance(info.value, AssertionError)
    for kw in ({"target": 12}, {"target": [0, 1, 2]}, {"baselines": torch.zeros(3, 11)}):
        with pytest.raises(AssertionError) as info:  # what Captum code catches
            ig.attribute(x, **kw)
        assert isinstance(info.value, AttributionInputError) and isinstance(info.value, ValueError)
    assert model.calls <= 1  # a target out of range shows on the first output


def test_unknown_keywords_are_type_errors_naming_the_class():
    x = torch.randn(2, 12)
    with pytest.raises(TypeError, match=r"Saliency.attribute\(\) got unexpected keyword argument\(s\) 'tolerance'"):
        fastattr.Saliency(CallCounter()).attribute(x, target=0, tolerance=0.1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'return_convergence_delta'"):
        fastattr.Saliency(CallCounter()).attribute(x, target=0, return_convergence_delta=True)
