"""Audits of stored attributions (the fastattr.audit package, `fastattr audit`).

Each metric is checked against a value computed by hand on a tiny input; the model-based checks
run on the demo's CNN (trained once per session, a few seconds), where the right answer is known.
"""

from __future__ import annotations

import importlib.util
import json
import math
import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn

import fastattr
from fastattr import demo
from fastattr.audit import (
    AuditError,
    Distribution,
    auc,
    audit_run,
    entropy,
    gini,
    mass_inside,
    perturbation_curves,
    pointing_game,
    randomization_check,
    rankdata,
    spearman,
    summary_lines,
    topk_overlap,
    write_report,
)
from fastattr.store import Block, RunWriter

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(path, attrs: np.ndarray, *, target: np.ndarray, output: np.ndarray | None = None, baseline_output: np.ndarray | None = None,
              delta: np.ndarray | None = None, method: str = "integrated_gradients", shard_rows: int = 64, params: dict | None = None,
              extras: dict[str, np.ndarray] | None = None) -> str:  # fmt: skip
    """A run directory written with RunWriter directly (no model): the audit reads only the store."""
    n = len(attrs)
    output = np.ones(n, np.float32) if output is None else output
    baseline_output = np.zeros(n, np.float32) if baseline_output is None else baseline_output
    flat = attrs.reshape(n, -1).astype(np.float64)
    delta = (flat.sum(1) - (output - baseline_output)).astype(np.float32) if delta is None else delta
    extras = extras or {}
    with RunWriter(path, config={"method": method, "params": params or {}}, total=n, shard_rows=shard_rows, compression="none") as w:
        for lo in range(0, n, shard_rows):
            hi = min(n, lo + shard_rows)
            f = flat[lo:hi]
            stats = {"sum": f.sum(1), "l1": np.abs(f).sum(1), "l2": np.sqrt((f * f).sum(1)), "absmax": np.abs(f).max(1)}
            stats = {k: v.astype(np.float32) for k, v in stats.items()}
            stats["nonfinite"] = (~np.isfinite(f)).sum(1).astype(np.int32)
            w.put(Block(lo, hi, {"x": attrs[lo:hi].astype(np.float32)}, target[lo:hi].astype(np.int64), output[lo:hi].astype(np.float32),
                        baseline_output[lo:hi].astype(np.float32), delta[lo:hi].astype(np.float32), np.full(hi - lo, 8, np.int32), stats,
                        extras={k: v[lo:hi] for k, v in extras.items()}))  # fmt: skip
    return str(path)


# ----------------------------------------------------------------------------------------------
# metrics against hand-computed values
# ----------------------------------------------------------------------------------------------


def test_gini_and_entropy_by_hand():
    a = np.array([[0, 0, 0, 4], [1, 1, 1, 1], [1, -2, 3, -4], [0, 0, 0, 0]], dtype=np.float64)
    g = gini(a)
    # sorted |a| = a_(k): G = sum (2k - n - 1) a_(k) / (n sum a); n = 4 -> weights -3, -1, 1, 3
    assert g[0] == pytest.approx(3 * 4 / (4 * 4))  # 0.75 = 1 - 1/n: one feature holds everything
    assert g[1] == pytest.approx(0.0)
    assert g[2] == pytest.approx((-3 * 1 - 1 * 2 + 1 * 3 + 3 * 4) / (4 * 10))  # 0.25
    assert math.isnan(g[3])
    h, hn = entropy(a)
    assert h[0] == pytest.approx(0.0) and hn[0] == pytest.approx(0.0)
    assert h[1] == pytest.approx(math.log(4)) and hn[1] == pytest.approx(1.0)
    p = [0.1, 0.2, 0.3, 0.4]
    assert h[2] == pytest.approx(-sum(q * math.log(q) for q in p))
    assert hn[2] == pytest.approx(-sum(q * math.log(q) for q in p) / math.log(4))
    assert math.isnan(h[3])


def test_ranks_spearman_topk_by_hand():
    np.testing.assert_allclose(rankdata(np.array([[3.0, 1.0, 2.0, 2.0]])), [[4.0, 1.0, 2.5, 2.5]])
    assert spearman(np.array([[1.0, 2, 3, 4]]), np.array([[4.0, 3, 2, 1]]))[0] == pytest.approx(-1.0)
    # ties: ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4); centred dot 4.5, norms^2 4.5 and 5
    assert spearman(np.array([[1.0, 2, 2, 3]]), np.array([[1.0, 2, 3, 4]]))[0] == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert math.isnan(spearman(np.array([[1.0, 1, 1]]), np.array([[1.0, 2, 3]]))[0])  # constant row: undefined
    # top-2 by magnitude: a -> {0, 1}, b -> {1, 2}: one of two shared
    assert topk_overlap(np.array([[4.0, -3, 1, 0]]), np.array([[0.0, 3, 4, -1]]), 2)[0] == pytest.approx(0.5)
    with pytest.raises(AuditError, match="top-k"):
        topk_overlap(np.zeros((1, 3)), np.zeros((1, 3)), 4)


def test_localization_and_auc_by_hand():
    a = np.array([[1.0, -3.0, 0.0, 4.0], [0.0, 5.0, 1.0, 0.0]])
    m = np.array([[True, True, False, False], [False, True, False, False]])
    np.testing.assert_allclose(mass_inside(a, m), [(1 + 3) / 8, 5 / 6])
    np.testing.assert_array_equal(pointing_game(a, m), [False, True])  # the top value 4 lies outside the first mask
    np.testing.assert_allclose(auc(np.array([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]])), [0.5, 1.0])


def test_metrics_count_only_the_first_n_features_of_each_row():
    """With n (real features per row), every metric equals the metric of the row cut to n, whatever
    the padding holds."""
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((5, 9)), rng.standard_normal((5, 9))
    mask = rng.random((5, 9)) < 0.5
    n = np.array([9, 4, 2, 7, 3])
    for i, k in enumerate(n):
        x, y, m = a[i : i + 1, :k], b[i : i + 1, :k], mask[i : i + 1, :k]
        assert gini(a, n)[i] == pytest.approx(gini(x)[0])
        assert entropy(a, n)[0][i] == pytest.approx(entropy(x)[0][0]) and entropy(a, n)[1][i] == pytest.approx(entropy(x)[1][0])
        assert spearman(a, b, n)[i] == pytest.approx(spearman(x, y)[0])
        assert topk_overlap(a, b, np.minimum(2, n), n)[i] == pytest.approx(topk_overlap(x, y, min(2, k))[0])
        assert mass_inside(a, mask, n)[i] == pytest.approx(mass_inside(x, m)[0])
        assert pointing_game(a, mask, n)[i] == pointing_game(x, m)[0]
    with pytest.raises(AuditError, match="top-k needs 1 <= k <= 2 features, got k=3"):
        topk_overlap(a, b, 3, n)


def test_distribution_exact_then_bounded():
    d = Distribution(np.linspace(0, 10, 11), reservoir=100)
    d.add(np.array([1.0, 2.0, 3.0, np.nan, 12.0]))
    r = d.to_dict()
    assert r["count"] == 4 and r["nonfinite"] == 1 and r["mean"] == pytest.approx(4.5)
    assert r["quantiles"]["p50"] == pytest.approx(2.5) and r["quantiles_exact"]
    assert r["histogram"]["overflow"] == 1 and sum(r["histogram"]["counts"]) == 3
    big = Distribution(np.linspace(0, 1, 11), reservoir=500, seed=1)
    for chunk in np.random.default_rng(0).random((40, 1000)):  # 40k values, only 500 kept
        big.add(chunk)
    r = big.to_dict()
    assert r["count"] == 40000 and not r["quantiles_exact"] and big._res.size == 500
    assert r["mean"] == pytest.approx(0.5, abs=0.01)
    assert r["quantiles"]["p50"] == pytest.approx(0.5, abs=0.08)  # a 500-value reservoir's median of U(0, 1)
    assert sum(r["histogram"]["counts"]) == 40000


def test_streamed_run_metrics_by_hand(tmp_path):
    a = np.array([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]], [[3.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, np.nan]], [[0.0, 0.0], [0.0, 0.0]]])
    a = a[:, None]  # (5, 1, 2, 2)
    target = np.array([0, 1, 0, 1, 2])
    output, base = np.array([2.0, 2.0, 2.0, 2.0, 1.0]), np.array([0.0, 0.0, 0.0, 0.0, 1.0])
    delta = np.array([-1.0, 2.0, 2.0, np.nan, -0.5])
    run = write_run(tmp_path / "a", a, target=target, output=output, baseline_output=base, delta=delta, shard_rows=2)
    other = write_run(tmp_path / "b", -a, target=target, shard_rows=3)  # different shard layout, same indices
    masks = np.zeros((5, 1, 2, 2), dtype=bool)
    masks[:, 0, 0, 0] = True
    res = audit_run(run, compare=other, masks=masks, top_k=1, batch_size=2)
    doc = res.doc
    assert doc["samples"] == 5
    r = doc["residual"]
    assert r["abs"]["count"] == 4 and r["nonfinite"] == 1 and r["abs"]["max"] == pytest.approx(2.0)
    assert r["abs"]["quantiles"]["p50"] == pytest.approx(1.5)  # |delta| = 1, 2, 2, 0.5
    # relative to |F(x) - F(x0)| = 2, 2, 2, 0 (floored at 1e-12)
    assert r["rel"]["min"] == pytest.approx(0.5) and r["rel"]["max"] == pytest.approx(0.5 / 1e-12)
    nf = doc["nonfinite"]
    assert (nf["values"], nf["samples"], nf["delta"], nf["attribution_samples"], nf["flagged_index"]) == (1, 1, 1, 1, [3])
    assert doc["zero_samples"] == 1
    assert doc["gini"]["count"] == 3
    assert doc["gini"]["mean"] == pytest.approx((0.75 + 0.0 + (1 * 1 + 3 * 3) / (4 * 4)) / 3)  # sample 2 sorted: 0, 0, 1, 3
    # class 0: mean of samples 0 and 2; class 1: sample 1 and sample 3 with NaN as 0; class 2: zeros
    np.testing.assert_allclose(res.class_maps["0"], [[[2.0, 0.5], [0.0, 0.0]]])
    np.testing.assert_allclose(res.class_maps["1"], [[[0.5, 0.5], [0.5, 0.5]]])
    assert doc["class_maps"]["classes"]["1"]["count"] == 2 and doc["class_maps"]["classes"]["2"]["l1"] == 0.0
    ag = doc["agreement"]
    assert ag["samples"] == 3 and ag["top_k"] == 1
    assert ag["rel_l2"]["mean"] == pytest.approx(2.0)  # ||a - (-a)|| / ||-a||
    assert ag["topk_overlap"]["mean"] == pytest.approx(1.0)  # magnitudes agree
    # sample 1 is constant (undefined, counted as non-finite); samples 0 and 2 are exactly reversed
    assert ag["spearman"]["count"] == 2 and ag["spearman"]["mean"] == pytest.approx(-1.0)
    loc = doc["localization"]
    assert loc["samples"] == 3
    assert loc["mass_inside"]["mean"] == pytest.approx((1.0 + 0.25 + 0.75) / 3)
    assert loc["pointing_game"] == pytest.approx(1.0)  # argmax is the first element in all three
    assert loc["mask_fraction"] == pytest.approx(0.25)
    assert res.passed and doc["violations"] == []
    bad = audit_run(run, thresholds={"max_residual": 1.0, "max_nonfinite": 0})
    assert not bad.passed and len(bad.violations) == 2 and "max absolute residual 2 > 1" in bad.violations[0]


def test_audit_errors_before_work(tmp_path):
    a = np.ones((6, 1, 2, 2))
    run = write_run(tmp_path / "a", a, target=np.zeros(6))
    short = write_run(tmp_path / "short", a[:4], target=np.zeros(4))
    with pytest.raises(AuditError, match=r"does not store samples \[4, 6\)"):
        audit_run(run, compare=short)
    with pytest.raises(AuditError, match="does not broadcast"):
        audit_run(run, masks=np.ones((6, 3, 3), dtype=bool))
    with pytest.raises(AuditError, match="masks hold 2 samples"):
        audit_run(run, masks=np.ones((2, 1, 2, 2), dtype=bool))
    with pytest.raises(AuditError, match="both the model and the run's data"):
        audit_run(run, model=nn.Linear(4, 2))
    with pytest.raises(AuditError, match="unknown thresholds"):
        audit_run(run, thresholds={"max_residul": 0.1})
    with pytest.raises(AuditError, match="need a run to compare"):
        audit_run(run, thresholds={"min_agreement": 0.9})
    with pytest.raises(AuditError, match="no attribution 'y'"):
        audit_run(run, name="y")
    with pytest.raises(AuditError, match="replacement"):
        audit_run(run, replacement="noise")


def test_perturbation_curves_on_a_linear_model_by_hand():
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 2.0, 1.0, 0.0]]))
    x = torch.ones(1, 4)
    attr = x * model.weight  # the right ranking: features 0, 1, 2, 3
    d, i = perturbation_curves(model, x, attr, torch.zeros(1, dtype=torch.long), steps=4, score="logit", max_rows=3)
    np.testing.assert_allclose(d, [[6.0, 3.0, 1.0, 0.0, 0.0]])  # delete 3, then 2, then 1, then 0
    np.testing.assert_allclose(i, [[0.0, 3.0, 5.0, 6.0, 6.0]])
    assert auc(d)[0] == pytest.approx((6 + 3 + 1 + 0) / 4 - 3 / 4)
    rd, ri = perturbation_curves(model, x, None, torch.zeros(1, dtype=torch.long), steps=4, score="logit", generator=np.random.default_rng(0))
    assert auc(rd)[0] >= auc(d)[0] and auc(ri)[0] <= auc(i)[0]  # no order deletes faster than the right one
    # Blur keeps a constant image as it is, so deleting into the blur changes nothing: sum of 25 pixels of 2.
    summer = nn.Sequential(nn.Flatten(), nn.Linear(25, 1, bias=False))
    nn.init.ones_(summer[1].weight)
    img = torch.full((1, 1, 5, 5), 2.0)
    d, i = perturbation_curves(summer, img, torch.rand(1, 1, 5, 5), torch.zeros(1, dtype=torch.long), steps=5, replacement="blur", blur_sigma=1.5, score="logit")
    np.testing.assert_allclose(d, np.full((1, 6), 50.0), rtol=1e-5)
    np.testing.assert_allclose(i, np.full((1, 6), 50.0), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# the demo model: right rankings and the randomization check
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_setup(tmp_path_factory, single_thread):
    """The demo CNN (1500 training images, ~4 s), 160 test images with masks, and an IG run."""
    model = demo.trained_model(train_samples=1500)
    x, y, masks = demo.make_dataset(160, seed=1)
    root = tmp_path_factory.mktemp("audit-demo")
    np.save(root / "x.npy", x.numpy())
    np.save(root / "masks.npy", masks.numpy())
    fastattr.run(model, x.numpy(), str(root / "ig"), target=y.numpy(), n_steps=16, shard_size=64, progress=False)
    return model, x, y, masks, root


def test_deletion_insertion_beat_random_on_the_demo(demo_setup):
    model, _, _, _, root = demo_setup
    res = audit_run(root / "ig", model=model, data=str(root / "x.npy"), masks=str(root / "masks.npy"), sample=48, steps=12,
                    randomization="none", thresholds={"require_beats_random": True, "min_mass_inside": 0.3})  # fmt: skip
    p = res.doc["perturbation"]
    assert p["samples"] == 48 and len(p["deletion"]["curve"]) == 13 and p["fraction"][0] == 0 and p["fraction"][-1] == 1
    assert p["deletion"]["auc"] < p["random_control"]["deletion"]["auc"] - 0.2
    assert p["insertion"]["auc"] > p["random_control"]["insertion"]["auc"] + 0.2
    assert p["beats_random"] and p["deletion_beats_random_share"] > 0.9
    assert res.doc["localization"]["mass_inside"]["mean"] > 10 * res.doc["localization"]["mask_fraction"]
    assert res.passed, res.violations
    blur = audit_run(root / "ig", model=model, data=str(root / "x.npy"), sample=16, steps=6, replacement="blur", randomization="none")
    assert blur.doc["perturbation"]["beats_random"] and blur.doc["perturbation"]["blur_sigma"] == 2.0


def test_randomization_passes_for_ig_and_fails_for_the_input(demo_setup, tmp_path):
    model, x, y, _, root = demo_setup
    res = audit_run(root / "ig", model=model, data=str(root / "x.npy"), sample=24, steps=4, randomization="cascade",
                    thresholds={"require_randomization": True})  # fmt: skip
    rnd = res.doc["randomization"]
    assert [r["layer"] for r in rnd["layers"]] == ["6 (Linear)", "2 (Conv2d)", "0 (Conv2d)"]  # top layer first
    assert rnd["reproduced"] > 0.95  # IG re-run from the manifest's parameters reproduces the stored attributions
    assert rnd["passed"] and rnd["final_similarity"] < 0.5 and res.passed
    # An "edge detector" that ignores the model: the attribution is the input itself.
    run = write_run(tmp_path / "input", x.numpy(), target=y.numpy(), method="identity")
    res = audit_run(run, model=model, data=str(root / "x.npy"), sample=24, steps=4, randomization="all",
                    attribute_fn=lambda m, xs, t: xs, thresholds={"require_randomization": True})  # fmt: skip
    rnd = res.doc["randomization"]
    assert rnd["layers"][0]["layer"] == "all layers" and rnd["final_similarity"] == pytest.approx(1.0)
    assert not rnd["passed"] and not res.passed and "randomization check failed" in res.violations[0]
    with pytest.raises(AuditError, match="method 'identity' cannot be rebuilt from its manifest.*--randomization none"):
        audit_run(run, model=model, data=str(root / "x.npy"))  # no attribute_fn: refused before any work


def test_randomization_check_leaves_the_model_alone(demo_setup):
    model, x, y, _, _ = demo_setup
    before = [p.detach().clone() for p in model.parameters()]
    saliency = fastattr.Saliency(model).attribute(x[:8], target=y[:8]).numpy()
    out = randomization_check(model, x[:8], y[:8], saliency, lambda m, xs, t: fastattr.Saliency(m).attribute(xs, target=t), mode="all")
    assert out["reproduced"] == pytest.approx(1.0) and out["samples"] == 8
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ----------------------------------------------------------------------------------------------
# streaming memory, the report, the command line
# ----------------------------------------------------------------------------------------------


def _peak_bytes(run_dir: str) -> int:
    tracemalloc.start()
    try:
        audit_run(run_dir, batch_size=64)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streaming_memory_stays_flat(tmp_path):
    rng = np.random.default_rng(0)
    sizes = (512, 4096)
    runs = []
    for n in sizes:
        a = rng.standard_normal((n, 1, 32, 32)).astype(np.float32)
        runs.append(write_run(tmp_path / f"n{n}", a, target=rng.integers(0, 4, n), shard_rows=512))
        del a
    audit_run(runs[0], batch_size=64)  # warm-up: imports and caches are not the audit's memory
    small, large = (_peak_bytes(r) for r in runs)
    large_bytes = sizes[1] * 32 * 32 * 4  # 16 MiB of attributions in the large run, 2 MiB in the small one
    assert large < 1.3 * small + 256 * 1024, (small, large)  # 8x the samples, about the same peak
    assert large < large_bytes / 3, (large, large_bytes)  # a few batches' worth, not the run


def test_report_renders_with_valid_pngs(demo_setup, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    model, _, _, _, root = demo_setup
    compare = root / "sal"
    fastattr.run(model, str(root / "x.npy"), str(compare), method="saliency", target="predicted", shard_size=100, progress=False)
    res = audit_run(root / "ig", model=model, data=str(root / "x.npy"), compare=compare, masks=str(root / "masks.npy"), sample=16, steps=4,
                    randomization_sample=8)  # fmt: skip
    paths = write_report(res, tmp_path / "report")
    pngs = {"residuals", "sparseness", "class_maps", "agreement", "localization", "perturbation", "randomization"}
    assert pngs <= set(paths)
    for kind in pngs:
        assert paths[kind].read_bytes()[:8] == PNG_SIGNATURE
        img = matplotlib.image.imread(paths[kind])
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert f"]({paths[kind].name})" in paths["markdown"].read_text()
    doc = json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    for key in ("residual.abs", "gini", "agreement.spearman", "localization.mass_inside", "deletion", "randomization"):
        assert doc["definitions"][key]
    assert doc["perturbation"]["deletion"]["auc"] == pytest.approx(res.doc["perturbation"]["deletion"]["auc"])
    assert set(np.load(paths["class_maps_npz"]).files) == {"target_0", "target_1", "target_2", "target_3"}
    lines = summary_lines(res)
    assert len(lines) <= 24 and lines[-1] == "PASSED"


def test_cli_audit_exit_codes(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from fastattr.cli import main

    a = np.random.default_rng(0).standard_normal((20, 1, 4, 4))
    run = write_run(tmp_path / "run", a, target=np.arange(20) % 3, delta=np.full(20, 0.1, np.float32))
    assert main(["audit", run, "--report", str(tmp_path / "ok"), "--max-residual", "0.2"]) == 0
    assert "PASSED" in capsys.readouterr().out and (tmp_path / "ok" / "report.md").is_file()
    assert main(["audit", run, "--report", str(tmp_path / "gate"), "--max-residual", "0.05"]) == 1  # gates a pipeline
    out = capsys.readouterr().out
    assert "FAILED: max absolute residual 0.1 > 0.05" in out and (tmp_path / "gate" / "audit.json").is_file()
    assert main(["audit", run, "--report", str(tmp_path / "bad"), "--compare", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastattr: error: --compare: no such file") and err.count("\n") == 1
    assert main(["audit", run, "--report", str(tmp_path / "bad"), "--min-agreement", "0.9"]) == 2
    assert "need a run to compare with" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# one verdict, non-finite samples, padded token runs (issue 13)
# ----------------------------------------------------------------------------------------------

SQUARES = '''
import torch
from torch import nn


class Squares(nn.Module):
    """F(x)_c = s_c * sum(x^2): input x gradient = 2 s_c x^2, ranked like x^2 whatever s is."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.tensor([1.0, 2.0]))

    def forward(self, x):
        return (x * x).sum(1, keepdim=True) * self.s


def squares():
    return Squares()
'''


def test_cli_audit_gives_one_verdict_for_checks_not_required(tmp_path, capsys, monkeypatch):
    """A randomization check that does not pass but is not required is a warning: the summary,
    the report and the exit code agree (PASSED, exit 0, no FAILED line); required, it fails all three."""
    pytest.importorskip("matplotlib")
    from fastattr.cli import main

    (tmp_path / "sq_models.py").write_text(SQUARES)
    monkeypatch.syspath_prepend(str(tmp_path))
    import sq_models

    x = np.random.default_rng(0).standard_normal((16, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    run = str(tmp_path / "run")
    fastattr.run(sq_models.squares(), x, run, method="input_x_gradient", target=0, progress=False)
    common = ["--model", "sq_models:squares", "--data", str(tmp_path / "x.npy"), "--sample", "8", "--steps", "4", "--randomization", "all"]
    assert main(["audit", run, "--report", str(tmp_path / "warn"), *common]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if not line.startswith("report: ")]
    assert "FAILED" not in out, out
    assert any(line.startswith("WARNING: randomization check did not pass") for line in lines), out
    assert lines[-1].startswith("PASSED with") and "warning" in lines[-1], out
    doc = json.loads((tmp_path / "warn" / "audit.json").read_text())
    assert doc["passed"] and doc["violations"] == [] and any("randomization" in w for w in doc["warnings"])
    assert not doc["randomization"]["passed"]  # the measurement itself is unchanged
    md = (tmp_path / "warn" / "report.md").read_text()
    assert "FAILED" not in md and "**PASSED**" in md and "- warning: randomization check did not pass" in md

    assert main(["audit", run, "--report", str(tmp_path / "gate"), *common, "--require-randomization"]) == 1
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if not line.startswith("report: ")]
    assert lines[-1].startswith("FAILED: randomization check failed"), out
    assert "PASSED" not in out and "WARNING: randomization" not in out
    assert "**FAILED**" in (tmp_path / "gate" / "report.md").read_text()


def test_nonfinite_outputs_and_deltas_are_counted_named_and_gated(tmp_path, capsys):
    """What a model returning NaN for some samples leaves in a run: NaN output and delta with finite
    (zero) attributions; NaN at the baseline gives a NaN baseline output and delta, which is not an
    'undefined' residual for a method that defines one. The audit counts and names them, and
    --max-residual / --max-nonfinite fail on them."""
    pytest.importorskip("matplotlib")
    from fastattr.cli import main

    n = 12
    a = np.random.default_rng(1).standard_normal((n, 4))
    output, base = np.full(n, 2.0), np.zeros(n)
    delta = np.full(n, 1e-4)  # finite residuals are small: only the non-finite ones can fail --max-residual
    a[[2, 5, 7]] = 0.0  # the gradient of a NaN output at these samples
    output[[2, 5, 7]] = np.nan
    base[9] = np.nan  # the model returns NaN at the baseline of sample 9
    a[10, 1] = np.inf  # a non-finite attribution value
    delta[[2, 5, 7, 9, 10]] = np.nan
    run = write_run(tmp_path / "run", a, target=np.zeros(n), output=output, baseline_output=base, delta=delta)

    res = audit_run(run)
    nf = res.doc["nonfinite"]
    assert (nf["values"], nf["samples"]) == (1, 1)
    assert (nf["output"], nf["baseline_output"], nf["delta"], nf["attribution_samples"]) == (3, 1, 5, 1)
    assert nf["flagged"] == 5 and nf["flagged_index"] == [2, 5, 7, 9, 10]
    assert res.doc["residual"]["undefined"] == 0 and res.doc["residual"]["nonfinite"] == 5
    assert res.passed and len(res.warnings) == 1 and "#2, #5, #7, #9, #10" in res.warnings[0]

    gated = audit_run(run, thresholds={"max_residual": 0.01})
    assert not gated.passed and "5 samples have a non-finite residual" in gated.violations[0] and "#2" in gated.violations[0]
    assert not audit_run(run, thresholds={"max_rel_residual": 0.01}).passed
    strict = audit_run(run, thresholds={"max_nonfinite": 0})
    assert not strict.passed and "10 non-finite values" in strict.violations[0]  # 1 attribution + 3 outputs + 1 baseline + 5 deltas

    assert main(["audit", run, "--report", str(tmp_path / "r1"), "--max-residual", "0.01"]) == 1
    out = capsys.readouterr().out
    assert "#2, #5, #7, #9, #10" in out and "FAILED: 5 samples have a non-finite residual" in out
    assert main(["audit", run, "--report", str(tmp_path / "r2")]) == 0
    out = capsys.readouterr().out
    assert "WARNING: 5 samples hold non-finite values" in out and "PASSED with 1 warning" in out

    # saliency defines no residual: NaN delta and baseline output are expected there, not flagged
    sal = write_run(tmp_path / "sal", np.abs(a[:2]), target=np.zeros(2), output=np.ones(2), baseline_output=np.full(2, np.nan),
                    delta=np.full(2, np.nan), method="saliency")  # fmt: skip
    doc = audit_run(sal).doc
    assert doc["residual"]["undefined"] == 2 and doc["nonfinite"]["flagged"] == 0


def _real_token_metrics(a: np.ndarray, lengths: np.ndarray) -> dict[str, float]:
    """Gini and normalized entropy of each sample's real tokens, averaged over the samples."""
    g, hn = [], []
    for row, n in zip(a.reshape(len(a), a.shape[1], -1), lengths):
        real = row[:n].reshape(1, -1)
        if np.abs(real).sum() > 0:
            g.append(gini(real)[0])
            hn.append(entropy(real)[1][0])
    return {"gini": float(np.mean(g)), "entropy_normalized": float(np.mean(hn))}


def test_padded_token_run_metrics_count_only_real_tokens(tmp_path):
    """Per-token attributions stored as padded rows plus extras/lengths: every per-sample metric
    (Gini, entropy, agreement, localization, class maps) is computed on the real tokens only."""
    rng = np.random.default_rng(0)
    n, t = 6, 8
    lengths = np.array([8, 3, 5, 2, 6, 4])
    real = np.arange(t)[None, :] < lengths[:, None]
    a = np.where(real, rng.standard_normal((n, t)), 0.0)  # trimmed padding: exactly 0
    b = a + 0.3 * rng.standard_normal((n, t))  # the compared run, with values at the padding too
    masks = rng.random((n, t)) < 0.4
    masks[:, 0] = True
    target = np.array([0, 0, 1, 1, 0, 1])
    params = {"layer": ["embed"], "layer_reduce": "sum", "lengths": "mask"}
    kw = {"target": target, "method": "layer_integrated_gradients", "params": params, "extras": {"lengths": lengths.astype(np.int64)}}
    run = write_run(tmp_path / "a", a, shard_rows=4, **kw)
    other = write_run(tmp_path / "b", b, shard_rows=4, **kw)
    doc = audit_run(run, compare=other, masks=masks, top_k=2, batch_size=3).doc

    want = _real_token_metrics(a, lengths)
    assert doc["gini"]["mean"] == pytest.approx(want["gini"])
    assert doc["entropy_normalized"]["mean"] == pytest.approx(want["entropy_normalized"])
    assert doc["gini"]["mean"] != pytest.approx(float(gini(a).mean()))  # padding zeros would make it look sparser
    rows = [(a[i : i + 1, :k], b[i : i + 1, :k], masks[i : i + 1, :k]) for i, k in enumerate(lengths)]
    assert doc["agreement"]["spearman"]["mean"] == pytest.approx(np.mean([spearman(x, y)[0] for x, y, _ in rows]))
    assert doc["agreement"]["topk_overlap"]["mean"] == pytest.approx(np.mean([topk_overlap(x, y, 2)[0] for x, y, _ in rows]))
    rel = [np.linalg.norm(x - y) / np.linalg.norm(y) for x, y, _ in rows]
    assert doc["agreement"]["rel_l2"]["mean"] == pytest.approx(np.mean(rel))
    loc = doc["localization"]
    assert loc["mass_inside"]["mean"] == pytest.approx(np.mean([mass_inside(x, m)[0] for x, _, m in rows]))
    assert loc["pointing_game"] == pytest.approx(np.mean([pointing_game(x, m)[0] for x, _, m in rows]))
    assert loc["mask_fraction"] == pytest.approx(np.mean([m.mean() for _, _, m in rows]))
    # class maps: per position, the mean over the samples of the class that have a real token there
    res = audit_run(run)
    for cls in (0, 1):
        sel = target == cls
        want_map = np.where(real[sel].any(0), a[sel].sum(0) / np.maximum(real[sel].sum(0), 1), np.nan)
        np.testing.assert_allclose(res.class_maps[str(cls)], want_map)
    if importlib.util.find_spec("matplotlib") is not None:  # NaN positions of a class map still plot
        paths = write_report(res, tmp_path / "report")
        assert paths["class_maps"].read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.usefixtures("single_thread")
def test_padded_token_run_from_layer_ig_is_audited_on_real_tokens(tmp_path):
    """The same through a real run: layer IG over a padded text classifier with lengths="mask"."""
    from token_models import TokenClassifier, token_batch

    model = TokenClassifier(dim=16, heads=2, layers=1).eval()
    ids, mask, lengths = token_batch(12, 10, seed=3)
    fastattr.run(model, (ids.numpy(), mask.numpy()), tmp_path / "run", method="layer_ig", layer="embed", layer_reduce="sum",
                 lengths="mask", forward_args_inputs=1, baselines=0, target="predicted", n_steps=8, progress=False)  # fmt: skip
    stored = fastattr.open(tmp_path / "run")[0:12]
    a = stored["attributions"]["embed"]
    assert (lengths.numpy() < a.shape[1]).any()
    doc = audit_run(tmp_path / "run").doc
    want = _real_token_metrics(a, lengths.numpy())
    assert doc["gini"]["mean"] == pytest.approx(want["gini"], rel=1e-6)
    assert doc["entropy_normalized"]["mean"] == pytest.approx(want["entropy_normalized"], rel=1e-6)
