"""The fastattr command line, through subprocess, as installed."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

FASTATTR = shutil.which("fastattr") or ""

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    def cnn(width=4):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, 5))

    def broken():
        raise RuntimeError("weights not found")

    class Buggy(nn.Module):
        def forward(self, x):
            return {}["no such key"]  # a bug in model code: must surface with its traceback

    def buggy():
        return Buggy()

    class Tokens(nn.Module):
        # forward(ids (B, T) long, mask (B, T) or None) -> {"logits": (B, 3)}, like a Hugging Face output

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed, self.head = nn.Embedding(50, 8), nn.Linear(8, 3)

        def forward(self, ids, mask=None):
            h = self.embed(ids)
            h = h.mean(1) if mask is None else (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            return {"logits": self.head(h)}

    def tok():
        return Tokens()
    """
)

DATA = textwrap.dedent(
    """
    import numpy as np
    import torch

    def images(n=21, scale=1.0):
        return np.load("x.npy")[:n] * scale

    def token_batch(n=4, t=9):
        ids = torch.randint(1, 50, (n, t), generator=torch.Generator().manual_seed(0))
        return torch.utils.data.TensorDataset(ids, torch.ones(n, t))
    """
)


@pytest.fixture
def env(tmp_path):
    (tmp_path / "cli_models.py").write_text(MODELS)
    (tmp_path / "cli_data.py").write_text(DATA)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((21, 3, 6, 6)).astype(np.float32))
    return {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}


def fastattr(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [FASTATTR] if FASTATTR else [sys.executable, "-m", "fastattr"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_run_info_verify_happy_path(tmp_path, env):
    r = fastattr("run", "--model", "cli_models:cnn", "--model-arg", "width=4", "--data", "x.npy", "--out", "runs/ig", "--steps", "8", "--shard-size", "8", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "21 samples" in r.stdout and "completeness residual" in r.stdout
    info = fastattr("info", "runs/ig", env=env, cwd=tmp_path)
    assert info.returncode == 0 and "complete, 21 of 21 samples, 3 shards" in info.stdout
    assert 'method: integrated_gradients {"multiply_by_inputs": true, "n_steps": 8' in info.stdout and "precision: fp32" in info.stdout
    assert "model sha256: None" not in info.stdout and "versions: null" not in info.stdout
    ok = fastattr("verify", "runs/ig", env=env, cwd=tmp_path)
    assert ok.returncode == 0 and ok.stdout.startswith("OK")
    again = fastattr("run", "--model", "cli_models:cnn", "--model-arg", "width=4", "--data", "x.npy", "--out", "runs/ig", "--steps", "8", env=env, cwd=tmp_path)
    assert again.returncode == 0 and "nothing to do" in again.stdout  # a complete run is not recomputed

    import fastattr as fa  # the CLI's result equals the API's

    sys.path.insert(0, str(tmp_path))
    try:
        import cli_models
    finally:
        sys.path.remove(str(tmp_path))
    model = cli_models.cnn(width=4).eval()
    x = torch.from_numpy(np.load(tmp_path / "x.npy"))
    with torch.no_grad():
        pred = model(x).argmax(1)
    ref = fa.IntegratedGradients(model).attribute(x, target=pred, n_steps=8)
    np.testing.assert_allclose(fa.open(tmp_path / "runs/ig")[:]["attributions"]["x"], ref.numpy(), rtol=1e-5, atol=1e-7)


def test_torchscript_model_and_verify_catches_corruption(tmp_path, env):
    sys.path.insert(0, str(tmp_path))
    try:
        import cli_models
    finally:
        sys.path.remove(str(tmp_path))
    torch.jit.script(cli_models.cnn().eval()).save(str(tmp_path / "model.ts"))
    r = fastattr("run", "--model", "model.ts", "--data", "x.npy", "--out", "r", "--steps", "4", "--target", "2", "--shard-size", "10", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    shard = tmp_path / "r" / "shard-00000.h5"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    bad = fastattr("verify", "r", env=env, cwd=tmp_path)
    assert bad.returncode == 1 and "checksum" in bad.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no_such_module:f"], "cannot import 'no_such_module'"),
        (["--model", "cli_models:missing"], "has no attribute 'missing'"),
        (["--model", "cli_models:broken"], "raised RuntimeError: weights not found"),
        (["--model", "cli_models:cnn", "--target", "dog"], "--target must be predicted, label, an int or a .npy file"),
        (["--model", "cli_models:cnn", "--data", "nothing.npy"], "no such file: nothing.npy"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, env, args, message):
    base = {"--data": "x.npy"}
    argv = ["run", "--out", "o", *args]
    if "--data" not in args:
        argv += ["--data", base["--data"]]
    r = fastattr(*argv, env=env, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_wrong_shape_data_and_foreign_run_directory(tmp_path, env):
    np.save(tmp_path / "flat.npy", np.zeros((4, 7), dtype=np.float32))
    r = fastattr("run", "--model", "cli_models:cnn", "--data", "flat.npy", "--out", "o", env=env, cwd=tmp_path)
    # the model itself rejects the data: its own error, with the traceback into the model's code
    assert r.returncode == 1 and "Traceback" in r.stderr and "conv2d" in r.stderr, r.stderr
    assert fastattr("run", "--model", "cli_models:cnn", "--data", "x.npy", "--out", "o2", "--steps", "4", env=env, cwd=tmp_path).returncode == 0
    other = fastattr("run", "--model", "cli_models:cnn", "--data", "x.npy", "--out", "o2", "--steps", "6", env=env, cwd=tmp_path)
    assert other.returncode == 2 and "n_steps" in other.stderr, other.stderr
    debug = fastattr("--debug", "run", "--model", "cli_models:cnn", "--data", "x.npy", "--out", "o2", "--steps", "6", env=env, cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_help_has_examples(tmp_path, env):
    r = fastattr("run", "--help", env=env, cwd=tmp_path)
    assert r.returncode == 0 and "examples:" in r.stdout


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_demo_end_to_end_then_info_verify_render(tmp_path, env):
    r = fastattr("demo", "--samples", "300", "--steps", "16", "--out", "demo", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0] + " " + line.split()[1]: line for line in r.stdout.splitlines() if line.startswith("  ")}
    ig = float(lines["integrated gradients"].split()[2].rstrip("%"))
    rnd = float(lines["random attribution"].split()[2].rstrip("%"))
    assert ig > 5 * rnd, r.stdout  # trained-model attributions find the known region
    assert fastattr("verify", "demo", env=env, cwd=tmp_path).returncode == 0
    png = fastattr("render", "demo", "--data", "demo/inputs.npy", "--index", "0:9", "--out", "grid.png", "--size", "640x480", env=env, cwd=tmp_path)
    assert png.returncode == 0, png.stderr
    assert _png_size(tmp_path / "grid.png") == (640, 480)


def test_render_bars_for_vectors_and_missing_matplotlib(tmp_path, env):
    np.save(tmp_path / "tab.npy", np.random.default_rng(0).standard_normal((6, 12)).astype(np.float32))
    (tmp_path / "tab_models.py").write_text("import torch\ndef mlp():\n    torch.manual_seed(0)\n    return torch.nn.Sequential(torch.nn.Linear(12, 3))\n")
    assert fastattr("run", "--model", "tab_models:mlp", "--data", "tab.npy", "--out", "t", "--steps", "4", env=env, cwd=tmp_path).returncode == 0
    r = fastattr("render", "t", "--index", "0:6", "--out", "bars.png", "--size", "500x300", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert _png_size(tmp_path / "bars.png") == (500, 300)
    code = "import sys; sys.modules['matplotlib'] = None; from fastattr.cli import main; sys.exit(main(['render', 't', '--out', 'x.png']))"
    missing = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert missing.returncode == 2 and "needs matplotlib" in missing.stderr


def test_layers_lists_modules_and_shapes(tmp_path, env):
    r = fastattr("layers", "cli_models:cnn", "--input-shape", "3,6,6", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Conv2d" in r.stdout and "(B, 4, 6, 6)" in r.stdout and "(B, 5)" in r.stdout


def test_export_model_data_factory_and_mean_baseline(tmp_path, env):
    sys.path.insert(0, str(tmp_path))
    try:
        import cli_models
    finally:
        sys.path.remove(str(tmp_path))
    model = cli_models.cnn().eval()
    x = np.load(tmp_path / "x.npy")
    torch.export.save(torch.export.export(model, (torch.from_numpy(x[:2]),), dynamic_shapes=({0: torch.export.Dim("batch")},)), str(tmp_path / "m.pt2"))
    (tmp_path / "cli_data.py").write_text("import numpy as np\ndef images():\n    return np.load('x.npy')\n")
    r = fastattr("run", "--model", "m.pt2", "--data", "cli_data:images", "--out", "e", "--steps", "4", "--target", "1", "--baseline", "mean", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    import fastattr as fa

    mean = torch.from_numpy(x.astype(np.float64).mean(0).astype(np.float32))
    ref = fa.IntegratedGradients(model).attribute(torch.from_numpy(x), baselines=mean, target=1, n_steps=4)
    np.testing.assert_allclose(fa.open(tmp_path / "e")[:]["attributions"]["x"], ref.numpy(), rtol=1e-4, atol=1e-6)


def test_nan_sample_named_and_allow_nonfinite_flag(tmp_path, env):
    x = np.load(tmp_path / "x.npy")
    x[13, 1, 2, 2] = np.nan
    np.save(tmp_path / "nan.npy", x)
    args = ("run", "--model", "cli_models:cnn", "--data", "nan.npy", "--steps", "4", "--target", "1")
    r = fastattr(*args, "--out", "a", env=env, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "sample 13: input 0 contains NaN or inf" in r.stderr and "--allow-nonfinite" in r.stderr
    r = fastattr(*args, "--out", "b", "--allow-nonfinite", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    import fastattr as fa

    counts = fa.open(tmp_path / "b").field("stats/nonfinite")
    assert counts[13] > 0 and (np.delete(counts, 13) == 0).all()


def test_a_bug_keeps_its_traceback_and_exits_1(tmp_path, env):
    """Only fastattr's deliberate errors are one line (exit 2); anything else is a bug: traceback, exit 1."""
    r = fastattr("run", "--model", "cli_models:buggy", "--data", "x.npy", "--out", "o", "--steps", "4", env=env, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "Traceback" in r.stderr and "KeyError: 'no such key'" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("fastattr: unexpected KeyError")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--model", "cli_models:cnn", "--data", "x.npy", "--out", "o", "--batch-size", "many"], "argument --batch-size: must be auto or a positive int, got 'many'"),
        (["run", "--model", "cli_models:cnn", "--data", "x.npy", "--out", "o", "--steps", "0"], "argument --steps: must be a positive int or auto, got '0'"),
        (["run", "--model", "cli_models:cnn", "--data", "x.npy", "--out", "o", "--nt-samples", "-2"], "argument --nt-samples: must be a positive int, got '-2'"),
        # option errors found by fastattr itself (OptionError): one line, exit 2
        (["run", "--model", "cli_models:cnn", "--data", "x.npy", "--out", "o", "--method", "layer_ig", "--layer", "nope"], "layer 'nope' is not a submodule"),
        (["run", "--model", "cli_models:cnn", "--data", "x.npy", "--out", "o", "--nt-samples", "3"], "does not take option(s) nt_samples"),
        (["run", "--model", "cli_models:cnn", "--data", "x.npy", "--out", "o", "--method", "gradient_shap"], "gradient_shap needs references="),
        (["run", "--model", "cli_models:cnn", "--data", "x.npy", "--out", "o", "--baseline", "nothing.npy"], "--baseline: no such file: nothing.npy"),
        (["run", "--model", "cli_models:cnn", "--data", "x.npy", "--out", "o", "--data-arg", "n=3"], "--data-arg is for a package.module:factory data spec"),
        (["layers", "cli_models:cnn", "--input-shape", "3,x,6"], "argument --input-shape: must be comma-separated ints like 3,224,224, got '3,x,6'"),
        (["layers", "cli_models:tok", "--input-shape", "7", "--input-dtype", "long"], "--input-dtype long needs --vocab N"),
        (["layers", "cli_models:tok", "--input-shape", "7", "--input-dtype", "words", "--vocab", "9"], "unknown dtype 'words'"),
        (["layers", "cli_models:cnn"], "give --input-shape (with --input-dtype/--vocab for token ids) or --data"),
        (["render", "r", "--index", "a:b", "--out", "x.png"], "argument --index: must be START:STOP with ints, got 'a:b'"),
    ],
)
def test_argument_errors_are_short(tmp_path, env, argv, message):
    r = fastattr(*argv, env=env, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    if "argument " not in message:  # fastattr's own errors: one line (argparse's add its usage line)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_factories_import_from_the_current_directory(tmp_path, env):
    """As `python -m fastattr` does: the console script (and python -P) finds cwd's modules."""
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    commands = [[sys.executable, "-P", "-m", "fastattr"]] + ([[FASTATTR]] if FASTATTR else [])
    for cmd in commands:
        r = subprocess.run([*cmd, "layers", "cli_models:cnn", "--input-shape", "3,6,6"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert r.returncode == 0 and "(B, 4, 6, 6)" in r.stdout, (cmd, r.stderr)


def test_data_factory_arguments(tmp_path, env):
    r = fastattr("run", "--model", "cli_models:cnn", "--data", "cli_data:images", "--data-arg", "n=5", "--data-arg", "scale=2.0",
                 "--out", "d", "--steps", "4", "--target", "1", env=env, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    import fastattr as fa

    stored = fa.open(tmp_path / "d")[:]
    assert len(stored["index"]) == 5
    sys.path.insert(0, str(tmp_path))
    try:
        import cli_models
    finally:
        sys.path.remove(str(tmp_path))
    x = torch.from_numpy(np.load(tmp_path / "x.npy")[:5] * 2.0)
    ref = fa.IntegratedGradients(cli_models.cnn().eval()).attribute(x, target=1, n_steps=4)
    np.testing.assert_allclose(stored["attributions"]["x"], ref.numpy(), rtol=1e-5, atol=1e-7)


def test_layers_describes_token_models(tmp_path, env):
    """Integer inputs from --input-dtype long --vocab N, or the first samples of a data factory."""
    r = fastattr("layers", "cli_models:tok", "--input-shape", "7", "--input-dtype", "long", "--vocab", "50", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()}
    assert "Embedding" in rows["embed"] and "(B, 7, 8)" in rows["embed"] and "{logits: (B, 3)}" in rows["(model)"]
    d = fastattr("layers", "cli_models:tok", "--data", "cli_data:token_batch", "--data-arg", "t=5", env=env, cwd=tmp_path)
    assert d.returncode == 0, d.stderr
    assert "(B, 5, 8)" in {line.split()[0]: line for line in d.stdout.splitlines()}["embed"]


def test_integer_data_with_a_torchscript_model_is_one_clear_line(tmp_path, env):
    sys.path.insert(0, str(tmp_path))
    try:
        import cli_models
    finally:
        sys.path.remove(str(tmp_path))
    torch.jit.script(cli_models.cnn().eval()).save(str(tmp_path / "model.ts"))
    np.save(tmp_path / "ints.npy", np.arange(2 * 3 * 6 * 6).reshape(2, 3, 6, 6))
    r = fastattr("run", "--model", "model.ts", "--data", "ints.npy", "--out", "o", env=env, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "input 0 of the data has dtype torch.int64" in r.stderr and "needs floating point" in r.stderr


def test_train_mode_flag_is_recorded(tmp_path, env):
    r = fastattr("run", "--model", "cli_models:cnn", "--data", "x.npy", "--out", "t", "--steps", "2", "--target", "0", "--train-mode", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["config"]["train_mode"] is True
    info = fastattr("info", "t", env=env, cwd=tmp_path)
    assert "model mode: train" in info.stdout


def test_info_escapes_terminal_control_codes_from_the_manifest(tmp_path, env):
    assert fastattr("run", "--model", "cli_models:cnn", "--data", "x.npy", "--out", "r", "--steps", "2", "--target", "0", env=env, cwd=tmp_path).returncode == 0
    manifest = tmp_path / "r" / "manifest.json"
    man = json.loads(manifest.read_text())
    evil = "\x1b]0;owned\x07\x1b[2J\u202eevil\x9b31m"
    man["config"]["precision"] = evil
    man["config"]["method"] = "integrated_gradients" + evil
    manifest.write_text(json.dumps(man))
    r = fastattr("info", "r", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not any(ch in r.stdout for ch in "\x1b\x07\u202e\x9b"), repr(r.stdout)
    assert "\\x1b]0;owned\\x07\\x1b[2J\\u202eevil\\x9b31m" in r.stdout
    as_json = fastattr("info", "r", "--json", env=env, cwd=tmp_path)
    assert as_json.returncode == 0 and "\x1b" not in as_json.stdout and json.loads(as_json.stdout)["precision"] == evil


def test_baseline_npy_is_never_unpickled(tmp_path, env):
    evil = np.empty(2, dtype=object)
    evil[:] = [Path, Path]  # any object array is a pickle inside the .npy
    with open(tmp_path / "evil.npy", "wb") as f:
        np.lib.format.write_array(f, evil, allow_pickle=True)
    r = fastattr("run", "--model", "cli_models:cnn", "--data", "x.npy", "--out", "o", "--baseline", "evil.npy", env=env, cwd=tmp_path)
    assert r.returncode == 2 and "allow_pickle=False" in r.stderr, r.stderr


def test_output_into_a_closed_pipe_is_not_a_bug(tmp_path, env):
    """`fastattr info run | head`: a reader that leaves early (here: before anything is written) is no bug."""
    assert fastattr("run", "--model", "cli_models:cnn", "--data", "x.npy", "--out", "p", "--steps", "2", "--target", "0", env=env, cwd=tmp_path).returncode == 0
    cmd = f"{shlex.quote(sys.executable)} -m fastattr info p | true; echo ${{PIPESTATUS[0]}}"
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr and r.stdout.strip() in ("0", "141"), (r.stdout, r.stderr)


def test_a_directory_with_user_files_needs_allow_other_files_and_keeps_them(tmp_path, env):
    out = tmp_path / "mixed"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "shard-00000.h5").write_bytes(b"not fastattr's")
    args = ("run", "--model", "cli_models:cnn", "--data", "x.npy", "--out", "mixed", "--steps", "2", "--target", "0")
    r = fastattr(*args, env=env, cwd=tmp_path)
    assert r.returncode == 2 and "--allow-other-files" in r.stderr, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "shard-00000.h5"]  # refused before writing anything
    r = fastattr(*args, "--allow-other-files", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (out / "notes.txt").read_text() == "mine" and (out / "shard-00000.h5").read_bytes() == b"not fastattr's"
    assert fastattr("verify", "mixed", env=env, cwd=tmp_path).returncode == 0
    assert fastattr(*args, env=env, cwd=tmp_path).returncode == 0  # a fastattr run now: resuming needs no flag
    assert (out / "notes.txt").read_text() == "mine" and (out / "shard-00000.h5").read_bytes() == b"not fastattr's"
