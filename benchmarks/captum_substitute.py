"""pytest plugin: run Captum's own tests with fastattr's classes in place of Captum's.

Loaded by benchmarks/captum_suite.py as ``-p captum_substitute``. With FASTATTR_SUBSTITUTE=1 it
rebinds the seven classes fastattr implements (Saliency, InputXGradient, IntegratedGradients,
NoiseTunnel, GradientShap, LayerIntegratedGradients, LayerActivation) in ``captum.attr`` and in
each class's defining module, before any test module (or captum.testing's generated-test config)
is imported. Test modules therefore bind fastattr's class by ``from captum.attr... import X``,
while Captum's own modules, imported first, keep Captum's classes internally (NeuronIntegratedGradients
still runs Captum's IntegratedGradients, for instance): only what the tests call is substituted.
With FASTATTR_SUBSTITUTE=0 nothing is rebound: the same run with Captum alone.
FASTATTR_SUBSTITUTE_EXTRA (comma-separated names, e.g. "LayerGradientXActivation,LLMGradientAttribution")
substitutes further classes fastattr has, for experiments beyond the seven (captum_suite.py --extra).

Either way it records each test's outcome, the exception line of a failure, and whether one of
the seven classes (fastattr's when substituted, Captum's when not) was constructed while the test
ran, and writes {nodeid: {"outcome", "message", "used"}} to FASTATTR_SUITE_OUT (a JSON path).
"""

from __future__ import annotations

import functools
import importlib
import json
import os

import pytest

NAMES = (
    "Saliency",
    "InputXGradient",
    "IntegratedGradients",
    "NoiseTunnel",
    "GradientShap",
    "LayerIntegratedGradients",
    "LayerActivation",
)

_current: list[str | None] = [None]
_results: dict[str, dict] = {}


def _substitute(substitute: bool) -> list[str]:
    import captum.attr as captum_attr  # imports every Captum module first, with Captum's classes

    import fastattr

    done = []
    extra = [n for n in os.environ.get("FASTATTR_SUBSTITUTE_EXTRA", "").split(",") if n]
    for name in (*NAMES, *extra):
        original = getattr(captum_attr, name)
        replacement = getattr(fastattr, name)
        _record_construction(replacement if substitute else original)
        if not substitute:
            continue
        for module in (captum_attr, importlib.import_module(original.__module__)):
            if getattr(module, name) is original:
                setattr(module, name, replacement)
                done.append(f"{module.__name__}.{name}")
    return done


def _record_construction(cls: type) -> None:
    """Mark the running test as one that used fastattr whenever ``cls`` is instantiated."""
    init = cls.__init__
    if getattr(init, "_suite_wrapped", False):
        return

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        if _current[0] is not None:
            _results[_current[0]]["used"] = True
        return init(self, *args, **kwargs)

    wrapped._suite_wrapped = True  # type: ignore[attr-defined]
    cls.__init__ = wrapped  # type: ignore[misc]


def pytest_configure(config: pytest.Config) -> None:
    done = _substitute(os.environ.get("FASTATTR_SUBSTITUTE", "0") == "1")
    config._fastattr_substituted = done  # type: ignore[attr-defined]


def pytest_report_header(config: pytest.Config) -> str:
    done = getattr(config, "_fastattr_substituted", None)
    return f"fastattr substituted for: {', '.join(done)}" if done else "Captum alone (no substitution)"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _current[0] = item.nodeid
    _results[item.nodeid] = {"outcome": "passed", "message": "", "used": False}
    yield
    _current[0] = None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry = _results.setdefault(report.nodeid, {"outcome": "passed", "message": "", "used": False})
    if report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"
        entry["message"] = _message(report)
    elif report.failed:
        entry["outcome"] = "failed" if report.when == "call" else "error"
        entry["message"] = _message(report)


def _message(report: pytest.TestReport) -> str:
    """The exception's own line (``AssertionError: ...``), not the whole traceback."""
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message).strip()[:400]
    if isinstance(report.longrepr, tuple):  # a skip: (file, line, reason)
        return str(report.longrepr[2])[:400]
    return str(report.longrepr).strip().splitlines()[-1][:400] if report.longrepr else ""


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("FASTATTR_SUITE_OUT")
    if path:
        with open(path, "w") as f:
            json.dump(_results, f, indent=0, sort_keys=True)
