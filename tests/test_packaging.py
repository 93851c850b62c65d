"""Packaging, CLI and demo: what a user on a fresh machine touches first."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastattr
from fastattr import kernels

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_installed_as_subpackage_only():
    assert kernels.__name__ == "fastattr.kernels"
    assert Path(kernels.__file__).parent.name == "kernels"
    assert importlib.util.find_spec("kernels") is None or "site-packages" not in str(importlib.util.find_spec("kernels").origin)


def test_import_does_not_need_triton():
    code = "import sys; sys.modules['triton'] = None; import fastattr, torch; " "m = torch.nn.Linear(3, 2); print(fastattr.IntegratedGradients(m).attribute(torch.randn(2, 3), target=0).shape)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "FASTATTR_KERNELS": "auto"})
    assert out.returncode == 0, out.stderr
    assert "torch.Size([2, 3])" in out.stdout


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_cmd = next(c for c in commands if "pytest" in c)
    assert test_cmd in (ROOT / ".ci" / "run").read_text()
    assert any("fastattr demo" in c for c in commands)


def test_cli_help_and_version():
    out = subprocess.run([sys.executable, "-m", "fastattr", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and fastattr.__version__ in out.stdout


@pytest.mark.usefixtures("single_thread")
def test_demo_attributions_land_in_the_known_region(tmp_path):
    from fastattr.demo import run_demo

    report = run_demo(samples=64, train_samples=1200, n_steps=16, out=str(tmp_path / "demo"))
    assert report.test_accuracy > 0.9
    assert report.mass_ig > 5 * report.mass_random  # IG concentrates on the deciding patch
    assert report.median_rel_residual < 0.05
    assert all(isinstance(line, str) for line in report.lines())


@pytest.mark.usefixtures("single_thread")
def test_channels_last_layout_changes_nothing():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(5)).eval()
    x = torch.randn(3, 3, 9, 7)
    model(x)  # materialise the lazy layer
    ig = fastattr.IntegratedGradients(model)
    a, da = ig.attribute(x, target=1, n_steps=8, channels_last=True, return_convergence_delta=True)
    b, db = ig.attribute(x, target=1, n_steps=8, channels_last=False, return_convergence_delta=True)
    assert a.is_contiguous() and b.is_contiguous()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(da, db, rtol=1e-4, atol=1e-6)


def test_every_subpackage_is_listed_for_the_wheel():
    # setuptools installs only the packages listed in pyproject; a new subpackage left out works in
    # an editable checkout and is missing from every wheel.
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"fastattr." + p.parent.relative_to(ROOT / "fastattr").as_posix().replace("/", ".") for p in (ROOT / "fastattr").rglob("__init__.py")}
    found = {"fastattr" if f == "fastattr.." else f for f in found} | {"fastattr.kernels"}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
