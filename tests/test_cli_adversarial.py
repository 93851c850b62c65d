"""A new user's first hour with the command line and audits: each case here was a traceback, a silently
ignored option, a wrong count or a misleading line before its fix. In-process (cli.main) on tiny runs."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

import fastattr
from fastattr.audit import audit_run, summary_lines
from fastattr.cli import main

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    def cnn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)).eval()
    """
)
N = 12


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """x.npy (N, 3, 8, 8), masks, and a few small runs of the same CNN made through the command line."""
    d = tmp_path_factory.mktemp("advcli")
    (d / "adv_cli_models.py").write_text(MODELS)
    rng = np.random.default_rng(0)
    np.save(d / "x.npy", rng.standard_normal((N, 3, 8, 8)).astype(np.float32))
    masks = np.zeros((N, 3, 8, 8), dtype=bool)
    masks[:, :, 2:5, 2:5] = True
    np.save(d / "masks.npy", masks)
    np.save(d / "masks_hw.npy", masks[:, 0])
    np.save(d / "masks_1d.npy", np.arange(N))
    np.save(d / "masks_obj.npy", np.array([None] * N, dtype=object), allow_pickle=True)
    import sys

    sys.path.insert(0, str(d))
    common = ["-q", "run", "--model", "adv_cli_models:cnn", "--data", str(d / "x.npy"), "--device", "cpu"]
    runs = {
        "ig": ["--steps", "4"],
        "auto": ["--steps", "auto", "--tolerance", "0.05", "--max-steps", "17"],
        "cr": ["--steps", "4", "--channel-reduce", "sum"],
        "gs": ["--method", "gradient_shap", "--references", str(d / "x.npy"), "--n-samples", "2"],
    }
    for name, extra in runs.items():
        assert main([*common, *extra, "--out", str(d / name)]) == 0
    yield {"dir": d, "common": common}
    sys.path.remove(str(d))


def _one_line_error(capsys: pytest.CaptureFixture[str], rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.startswith("fastattr: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_audit_of_an_adaptive_steps_run_rebuilds_its_method(work: dict) -> None:
    # was: ValueError int('auto') (a traceback) in the randomization check's method_from_run
    d = work["dir"]
    result = audit_run(d / "auto", model=fastattr_model(), data=str(d / "x.npy"), sample=4, randomization_sample=4, steps=4)
    assert result.doc["randomization"]["reproduced"] > 0.99  # the run's own attributions, rebuilt with adaptive steps


def fastattr_model() -> torch.nn.Module:
    import adv_cli_models

    return adv_cli_models.cnn()


def test_audit_masks_of_one_channel_broadcast_over_the_channels(work: dict, capsys: pytest.CaptureFixture[str]) -> None:
    # (N, H, W) masks of (C, H, W) attributions: numpy broadcasting says they fit, but the batch did not (a traceback)
    d = work["dir"]
    full = audit_run(d / "ig", masks=str(d / "masks.npy")).doc["localization"]
    hw = audit_run(d / "ig", masks=str(d / "masks_hw.npy")).doc["localization"]
    assert hw["mass_inside"]["mean"] == pytest.approx(full["mass_inside"]["mean"])
    assert hw["pointing_game"] == full["pointing_game"]


@pytest.mark.parametrize(("masks", "needle"), [("masks_1d.npy", "one map per sample"), ("masks_obj.npy", "save them as a boolean array")])
def test_audit_rejects_masks_that_are_no_maps(work: dict, capsys: pytest.CaptureFixture[str], masks: str, needle: str) -> None:
    d = work["dir"]
    rc = main(["audit", str(d / "ig"), "--report", str(d / "rep"), "--masks", str(d / masks)])
    _one_line_error(capsys, rc, needle)


@pytest.mark.parametrize(
    "flags",
    [["--max-nonfinite", "-1"], ["--max-residual", "-0.5"], ["--max-rel-residual", "nan"], ["--min-mass-inside", "1.5", "--masks", "MASKS"],
     ["--min-agreement", "1.2", "--compare", "RUN"], ["--min-topk-overlap", "-0.1", "--compare", "RUN"]],
)  # fmt: skip
def test_audit_refuses_thresholds_no_audit_can_meet(work: dict, capsys: pytest.CaptureFixture[str], flags: list[str]) -> None:
    # was: accepted, then FAILED every audit ("0 non-finite values stored > -1 (...; samples )")
    d = work["dir"]
    flags = [str(d / "masks.npy") if f == "MASKS" else str(d / "ig") if f == "RUN" else f for f in flags]
    rc = main(["audit", str(d / "ig"), "--report", str(d / "rep"), *flags])
    _one_line_error(capsys, rc, flags[0])


@pytest.mark.parametrize(
    ("extra", "flags"),
    [(["--method", "saliency", "--steps", "8", "--rule", "riemann_left"], "--steps, --rule do not apply"),
     (["--method", "input_x_gradient", "--baseline", "0.5"], "--baseline does not apply"),
     (["--method", "gradient_shap", "--references", "X", "--baseline", "0.5"], "--references"),
     (["--method", "noise_tunnel", "--base-method", "saliency", "--steps", "7"], "noise_tunnel over saliency"),
     (["--method", "activations", "--layer", "1", "--target", "1"], "--target does not apply"),
     (["--method", "saliency", "--steps", "auto", "--tolerance", "0.1"], "--steps, --tolerance do not apply"),
     (["--method", "llm_ig", "--target", "1"], "each line's 'target' in the prompts file"),
     (["--steps", "8", "--rule", "simpson"], "--rule simpson refines adaptive steps only: add --steps auto"),
     (["--method", "layer_ig", "--steps", "4"], "this method needs --layer NAME:")],
)  # fmt: skip
def test_run_refuses_options_its_method_would_ignore(work: dict, capsys: pytest.CaptureFixture[str], extra: list[str], flags: str) -> None:
    # was: exit 0, the option silently dropped (the manifest recorded a run other than the command asked for)
    d = work["dir"]
    extra = [str(d / "x.npy") if e == "X" else e for e in extra]
    rc = main([*work["common"], *extra, "--out", str(d / "ignored")])
    _one_line_error(capsys, rc, flags)
    assert not (d / "ignored").exists()


def test_run_options_that_apply_are_kept(work: dict) -> None:
    meta = fastattr.open(work["dir"] / "auto").metadata
    assert meta["params"]["n_steps"] == "auto" and meta["params"]["max_steps"] == 17 and meta["target"] == "predicted"
    assert fastattr.open(work["dir"] / "ig").metadata["params"]["baselines"] == "zeros"


def test_info_leaves_reference_block_hashes_to_json(work: dict, capsys: pytest.CaptureFixture[str]) -> None:
    # was: the method line held one hash per reference sample (a line as long as the reference set)
    assert main(["info", str(work["dir"] / "gs")]) == 0
    text = capsys.readouterr().out
    assert "blocks" not in text and '"references"' in text and '"count": 12' in text
    assert main(["info", "--json", str(work["dir"] / "gs")]) == 0
    assert "blocks" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "needle"),
    [(["--name", "y"], "has no such attribution; it stores 'x'"), (["--percentile", "150"], "--percentile must be in [0, 100]"),
     (["--index", "40:50"], "selects no sample"), (["--index", "0:4", "--data", "OTHER"], "give the run's own data")],
)  # fmt: skip
def test_render_errors_are_one_line(work: dict, capsys: pytest.CaptureFixture[str], flags: list[str], needle: str) -> None:
    # was: KeyError / ValueError tracebacks, or a picture of another data set's images under the heatmaps
    d = work["dir"]
    np.save(d / "other.npy", np.zeros((N, 1, 24, 24), np.float32))
    flags = [str(d / "other.npy") if f == "OTHER" else f for f in flags]
    rc = main(["render", str(d / "ig"), "--out", str(d / "r.png"), *flags])
    _one_line_error(capsys, rc, needle)


def test_render_counts_what_it_drew(work: dict, capsys: pytest.CaptureFixture[str]) -> None:
    # was: "wrote r.png (20 samples, ...)" for --index 8:28 of a 12-sample run, which draws 4
    pytest.importorskip("matplotlib")
    d = work["dir"]
    assert main(["render", str(d / "ig"), "--out", str(d / "r.png"), "--index", "8:28", "--data", str(d / "x.npy"), "--size", "400x300"]) == 0
    assert "(4 samples, 400x300 pixels)" in capsys.readouterr().out


def test_render_draws_channel_reduced_maps_as_heatmaps(work: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # a channel-reduced run stores (8, 8) maps: was drawn as bar charts (the (N, H, W) heuristic wants > 8x8)
    pytest.importorskip("matplotlib")
    import fastattr.render as render

    seen: dict = {}
    real = render.render_grid
    monkeypatch.setattr(render, "render_grid", lambda a, out, **kw: seen.update(kw, shape=a.shape) or real(a, out, **kw))
    d = work["dir"]
    assert main(["render", str(d / "cr"), "--out", str(d / "cr.png"), "--index", "0:2", "--size", "200x200"]) == 0
    assert seen["shape"] == (2, 8, 8) and seen["image"] is True


def test_render_size_too_small_is_an_argument_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:  # was: numpy.linalg.LinAlgError from matplotlib's layout
        main(["render", "run", "--out", "r.png", "--size", "0x0"])
    assert exc.value.code == 2 and "at least 100x100" in capsys.readouterr().err


def test_layers_with_the_wrong_input_shape_says_which_flag(work: dict, capsys: pytest.CaptureFixture[str]) -> None:
    # was: the model's RuntimeError with a 25-line traceback "not a fastattr input error"
    rc = main(["layers", "adv_cli_models:cnn", "--input-shape", "3,8"])
    _one_line_error(capsys, rc, "(2, 3, 8) float32", "check --input-shape")


@pytest.mark.parametrize("device", ["gpu", "cuda:7"])
@pytest.mark.parametrize("command", [["demo", "--samples", "4"], ["layers", "adv_cli_models:cnn", "--input-shape", "3,8,8"], ["run", "--model", "m:f", "--data", "x.npy", "--out", "o"]])
def test_a_device_this_machine_lacks_is_one_line(work: dict, capsys: pytest.CaptureFixture[str], command: list[str], device: str) -> None:
    # was: torch's AssertionError ("Torch not compiled with CUDA enabled") / RuntimeError with a traceback
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    rc = main([*command, "--device", device])
    _one_line_error(capsys, rc, f"--device {device}")


@pytest.mark.parametrize("flag", ["--samples", "--steps"])
def test_demo_counts_must_be_positive(capsys: pytest.CaptureFixture[str], flag: str) -> None:
    with pytest.raises(SystemExit) as exc:  # was: a tensor-creation traceback (-5) after training the model
        main(["demo", flag, "-5"])
    assert exc.value.code == 2 and "must be a positive int" in capsys.readouterr().err


def test_demo_report_names_its_units_and_a_real_range() -> None:
    from fastattr.demo import DemoReport

    lines = DemoReport(1.0, 1.0, 10, 1.0, 3e-3, 9e-2, 0.6, 0.4, 0.03, run_dir="d").lines()
    assert "(relative)" in lines[2] and "max 9.00e-02 (absolute, in logits)" in lines[2]
    assert "--index 0:10 " in lines[-1]  # was 0:16 whatever --samples was


def test_audit_summary_says_one_class(work: dict) -> None:
    result = audit_run(work["dir"] / "ig")
    n = len(result.doc["class_maps"]["classes"])
    line = next(x for x in summary_lines(result) if x.startswith("per-class maps"))
    assert line == f"per-class maps: {n} class{'' if n == 1 else 'es'}"


def test_verify_passes_a_valid_activations_run_and_names_missing_residuals(work: dict, capsys: pytest.CaptureFixture[str]) -> None:
    # was: "FAILED (1 problems)": activations store no F(x) (NaN placeholders), which verify counted as
    # non-finite values, while info said complete and audit PASSED; saliency printed "|delta|: max nan"
    d = work["dir"]
    assert main([*work["common"], "--method", "activations", "--layer", "1", "--pool", "mean", "--out", str(d / "act")]) == 0
    assert main([*work["common"], "--method", "saliency", "--out", str(d / "sal")]) == 0
    capsys.readouterr()
    assert main(["verify", str(d / "act")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: 12 of 12") and "non-finite: 0 samples" in out and "the method defines none" in out
    assert main(["verify", str(d / "sal")]) == 0
    assert "nan" not in capsys.readouterr().out
    assert main(["verify", str(d / "ig")]) == 0
    assert "|delta|: max " in capsys.readouterr().out


def test_audit_of_a_stopped_run_warns_that_it_covers_part(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    # was: a plain PASSED, never saying that only 12 of 40 samples were audited
    class Stops(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.calls = torch.nn.Linear(10, 3), 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls > 3:
                raise KeyboardInterrupt  # what Ctrl-C does mid-run: the finished shards stay, status stopped
            return self.lin(x)

    x = np.random.default_rng(0).standard_normal((40, 10)).astype(np.float32)
    with pytest.raises(KeyboardInterrupt):
        fastattr.run(Stops().eval(), x, tmp_path / "run", method="saliency", examples_per_batch=4, shard_size=4, progress=False)
    rc = main(["audit", str(tmp_path / "run"), "--report", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    assert rc == 0 and "WARNING: the run is stopped: the audit covers the 12 of 40 samples" in out and "PASSED with 1 warning" in out


def test_demo_never_replaces_a_run_of_the_users_own(work: dict, capsys: pytest.CaptureFixture[str]) -> None:
    # was: `fastattr demo --out runs/ig` trained the demo and overwrote the user's run there (overwrite=True), silently
    d = work["dir"]
    before = fastattr.open(d / "ig").metadata["shards"]
    rc = main(["demo", "--samples", "4", "--steps", "2", "--out", str(d / "ig")])
    _one_line_error(capsys, rc, "holds no earlier demo")
    assert fastattr.open(d / "ig").metadata["shards"] == before


def test_audit_compare_warns_when_the_runs_attribute_different_targets(work: dict, capsys: pytest.CaptureFixture[str]) -> None:
    # was: agreement between attributions of different classes reported as if it measured the method, PASSED
    d = work["dir"]
    predicted = fastattr.open(d / "ig")[0:N]["target"]
    other = int((predicted[0] + 1) % 3)
    assert main([*work["common"], "--steps", "4", "--target", str(other), "--out", str(d / "t_other")]) == 0
    rc = main(["audit", str(d / "ig"), "--compare", str(d / "t_other"), "--report", str(d / "rep_t")])
    out = capsys.readouterr().out
    n = int((predicted != other).sum())
    assert rc == 0 and f"WARNING: {n} sample{'s have' if n > 1 else ' has'} different targets in the compared run (#0" in out
    assert main(["audit", str(d / "ig"), "--compare", str(d / "cr"), "--report", str(d / "rep_t")]) == 2  # shapes differ: still an error
    capsys.readouterr()
    assert main(["audit", str(d / "ig"), "--compare", str(d / "auto"), "--report", str(d / "rep_t")]) == 0
    assert "different targets" not in capsys.readouterr().out


def test_audit_refuses_data_the_run_did_not_attribute(work: dict, capsys: pytest.CaptureFixture[str]) -> None:
    # was: PASSED, the deletion curves and randomization scored on other samples (reproduced similarity ~0.2)
    d = work["dir"]
    x = np.load(d / "x.npy")
    x[5] += 1.0
    np.save(d / "x_other.npy", x)
    base = ["audit", str(d / "ig"), "--report", str(d / "rep_d"), "--model", "adv_cli_models:cnn", "--sample", "4", "--randomization", "none", "--steps", "4"]
    _one_line_error(capsys, main([*base, "--data", str(d / "x_other.npy")]), "samples 5:6 differ", "give the run's own data")
    assert main([*base, "--data", str(d / "x.npy")]) == 0
    assert "the model's parameters differ" not in capsys.readouterr().out


def test_audit_warns_when_the_model_is_not_the_runs(work: dict) -> None:
    # was: no word that the model-based checks measured another model than the one the run attributed
    other = fastattr_model()
    with torch.no_grad():
        other[0].weight.mul_(2)
    d = work["dir"]
    result = audit_run(d / "ig", model=other, data=str(d / "x.npy"), sample=4, randomization="none", steps=4)
    assert result.doc["run"]["model_matches"] is False and any("parameters differ" in w for w in result.warnings)
    same = audit_run(d / "ig", model=fastattr_model(), data=str(d / "x.npy"), sample=4, randomization="none", steps=4)
    assert same.doc["run"]["model_matches"] is True and not any("parameters differ" in w for w in same.warnings)


def test_verify_of_no_run_says_only_why(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    # was: "FAILED (1 problem): 0 of 0 samples in 0 shards, run ?" then "|delta|: max nan, median nan" before the reason
    assert main(["verify", str(tmp_path / "nope")]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED: ") and "no manifest" in out and out.count("\n") == 1


def test_render_into_a_missing_directory_is_one_line(work: dict, capsys: pytest.CaptureFixture[str]) -> None:
    # was: matplotlib's FileNotFoundError with a traceback, after reading the run
    rc = main(["render", str(work["dir"] / "ig"), "--out", str(work["dir"] / "no" / "r.png")])
    _one_line_error(capsys, rc, "no such directory")


def test_verify_of_a_float16_overflow_names_the_storage_fix(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    # was: only "fix the model or data ... or allow_nonfinite", though the run itself warned that float16 storage caused it
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((8, 10)).astype(np.float32)
    x[:2] *= 1e6
    fastattr.run(torch.nn.Linear(10, 3).eval(), x, tmp_path / "run", method="input_x_gradient", storage_dtype="float16", progress=False)
    assert main(["verify", str(tmp_path / "run")]) == 1
    out = capsys.readouterr().out
    assert "non-finite values" in out and "[0, 2)" in out and "rerun with storage_dtype float32" in out


def test_run_mismatch_names_the_flag_not_the_keyword(work: dict, capsys: pytest.CaptureFixture[str]) -> None:
    # was: "pass overwrite=True to replace it" to a command-line user, who has --overwrite
    rc = main([*work["common"], "--steps", "5", "--out", str(work["dir"] / "ig")])
    err = _one_line_error(capsys, rc, "differs in: params.n_steps", "pass --overwrite to replace it")
    assert "overwrite=True" not in err


def test_audit_of_a_gradient_shap_run_skips_randomization_by_default(work: dict, capsys: pytest.CaptureFixture[str]) -> None:
    # was: exit 2 on a valid run for a check nobody asked for (the default --randomization cascade cannot rebuild references)
    d = work["dir"]
    base = ["audit", str(d / "gs"), "--report", str(d / "rep_gs"), "--model", "adv_cli_models:cnn", "--data", str(d / "x.npy"), "--sample", "4", "--steps", "4"]
    assert main([*base, "--require-beats-random"]) in (0, 1)  # the deletion check ran; its verdict is the model's business
    out = capsys.readouterr().out
    assert "WARNING: randomization check skipped: the run's method 'gradient_shap' cannot be rebuilt" in out and "deletion AUC" in out
    _one_line_error(capsys, main([*base, "--require-randomization"]), "cannot be rebuilt")
    _one_line_error(capsys, main([*base, "--randomization", "cascade"]), "cannot be rebuilt")


@pytest.mark.parametrize(
    ("flags", "needle"),
    [(["--require-beats-random"], "(--require-beats-random) need the model and the run's data (--model and --data)"),
     (["--min-agreement", "0.5"], "need a run to compare with (--compare DIR2)"), (["--min-mass-inside", "0.3"], "(--masks masks.npy)"),
     (["--data", "X"], "(--model and --data; got only the data)")],
)  # fmt: skip
def test_audit_errors_name_the_flags_to_add(work: dict, capsys: pytest.CaptureFixture[str], flags: list[str], needle: str) -> None:
    # was: "thresholds ['require_beats_random'] need the model and data", API names with no flag to add
    flags = [str(work["dir"] / "x.npy") if f == "X" else f for f in flags]
    _one_line_error(capsys, main(["audit", str(work["dir"] / "ig"), "--report", str(work["dir"] / "rep_f"), *flags]), needle)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [(["--input-shape", "3,8,8", "--vocab", "5"], "--vocab applies to integer inputs"),
     (["--data", "X", "--input-dtype", "long"], "with --data the data's own samples are used")],
)  # fmt: skip
def test_layers_refuses_options_it_would_ignore(work: dict, capsys: pytest.CaptureFixture[str], flags: list[str], needle: str) -> None:
    # was: exit 0, --vocab (float inputs) or --input-dtype (with --data) silently ignored
    flags = [str(work["dir"] / "x.npy") if f == "X" else f for f in flags]
    _one_line_error(capsys, main(["layers", "adv_cli_models:cnn", *flags]), needle)


def test_run_warns_that_labels_go_unused_without_target_label(work: dict, caplog: pytest.LogCaptureFixture) -> None:
    # was: --labels read and fingerprinted, never used, without a word (the user meant --target label)
    d = work["dir"]
    np.save(d / "labels.npy", np.arange(N) % 3)
    with caplog.at_level("WARNING", logger="fastattr"):
        assert main([*work["common"][1:], "--steps", "2", "--labels", str(d / "labels.npy"), "--out", str(d / "lab")]) == 0
    assert "--labels is used only by --target label" in caplog.text


def test_report_makes_no_exactness_claim_about_an_empty_distribution(work: dict) -> None:
    # was: "| absolute residual | n/a | ... | 0 (exact) |" for a saliency run, which has no residual at all
    pytest.importorskip("matplotlib")
    from fastattr.audit import write_report

    d = work["dir"]
    assert main([*work["common"], "--method", "saliency", "--out", str(d / "sal_r")]) == 0
    paths = write_report(audit_run(d / "sal_r"), d / "rep_sal")
    text = open(paths["markdown"]).read()
    row = next(line for line in text.splitlines() if line.startswith("| absolute residual"))
    assert row.endswith("| 0 |") and "exact" not in row
    ig = open(write_report(audit_run(d / "ig"), d / "rep_ig")["markdown"]).read()
    assert "| 12 (exact quantiles) |" in ig


def test_global_flags_work_after_the_command(work: dict, capsys: pytest.CaptureFixture[str]) -> None:
    # was: `fastattr run ... -q` -> "unrecognized arguments: -q" (exit 2); only `fastattr -q run ...` worked
    d = work["dir"]
    assert main([*work["common"][1:], "--steps", "4", "--out", str(d / "ig"), "-q"]) == 0
    assert capsys.readouterr().out == ""
    assert main([*work["common"][1:], "--steps", "4", "--out", str(d / "ig")]) == 0
    assert "nothing to do" in capsys.readouterr().out  # without -q anywhere, the summary prints
    with pytest.raises(fastattr.errors.StoreError):  # --debug after the command re-raises, as before it
        main(["info", str(d / "nope"), "--debug"])


def test_run_help_examples_keep_their_line_breaks(capsys: pytest.CaptureFixture[str]) -> None:
    # was: the LLM example's "\" was a Python line continuation: two commands glued into one long line
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    lines = capsys.readouterr().out.split("examples:")[1].splitlines()
    assert any(line.rstrip().endswith("--gen-arg max_new_tokens=16 \\") for line in lines)
    assert all(len(line) < 160 for line in lines)
