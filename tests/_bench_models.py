"""benchmarks/models.py loaded by path: the models the tests share with the benchmarks have one
definition there (benchmarks never import tests/, and benchmarks/ is not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_NAME = "fastattr_benchmark_models"


def _load():  # noqa: ANN202 - a module
    if _NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(_NAME, Path(__file__).resolve().parents[1] / "benchmarks" / "models.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[_NAME]


models = _load()
