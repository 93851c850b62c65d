"""Captum's own test suite with fastattr's classes substituted for Captum's (issue 14's acceptance).

    python benchmarks/captum_suite.py --captum-src /work/captum-src --json benchmarks/results/captum-suite.json

--captum-src is a checkout of the pytorch/captum repository (only its tests/ folder is used) at the
commit matching the installed captum (see RESULTS.md for the one used). The script runs pytest on
its tests/attr and tests/metrics twice, each in a subprocess with the plugin
benchmarks/captum_substitute.py: once with Captum alone, once with fastattr's Saliency,
InputXGradient, IntegratedGradients, NoiseTunnel, GradientShap, LayerIntegratedGradients and
LayerActivation substituted for Captum's (Captum's helper models from captum.testing either way).

It prints, per test file, the tests passing with Captum alone and how many of those still pass
substituted, then every test that passes with Captum alone and fails substituted, with its
classification from KNOWN below ("captum-internals": the test inspects Captum's internals, so a
drop-in cannot pass it; "fastattr-gap": a gap in fastattr, with its reason) or "unclassified" (new:
read the message). The JSON holds every test's outcome in both runs and the classified failures.
Exit status: 0 when every such failure is "captum-internals", 1 otherwise.
--baseline JSON reuses the Captum-alone outcomes of an earlier --json (they do not depend on fastattr).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from captum_suite_known import KNOWN  # noqa: E402


def run_pytest(src: str, paths: list[str], substitute: bool, extra: list[str], timeout: int, extra_classes: str = "") -> dict:
    """One pytest run in ``src``; returns {nodeid: {"outcome", "message", "used"}}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([HERE, src, os.environ.get("PYTHONPATH", "")]),
            "FASTATTR_SUBSTITUTE": "1" if substitute else "0",
            "FASTATTR_SUBSTITUTE_EXTRA": extra_classes if substitute else "",
            "FASTATTR_SUITE_OUT": out,
            "HF_HUB_OFFLINE": "1",  # Captum's Hugging Face tests would wait on downloads; offline they fail at once, in both runs
            "TRANSFORMERS_OFFLINE": "1",
        }
        cmd = [sys.executable, "-m", "pytest", *paths, "-q", "-p", "captum_substitute", "-p", "no:cacheprovider",
               "-o", "addopts=", "--rootdir", src, *extra]  # fmt: skip
        label = "fastattr substituted" if substitute else "Captum alone"
        print(f"[{label}] {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, timeout=timeout)
        tail = proc.stdout.strip().splitlines()[-1:] or proc.stderr.strip().splitlines()[-1:]
        print(f"[{label}] {time.perf_counter() - start:.0f} s, pytest exit {proc.returncode}: {' '.join(tail)}", flush=True)
        if not os.path.exists(out):
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"pytest wrote no results ({label})")
        with open(out) as f:
            return json.load(f)


def classify(nodeid: str, message: str) -> tuple[str, str]:
    for test, error, category, reason in KNOWN:
        if re.search(test, nodeid) and re.search(error, message):
            return category, reason
    return "unclassified", message


def compare(captum: dict, fast: dict) -> dict:
    files: dict[str, Counter] = defaultdict(Counter)
    failures = []
    for nodeid in sorted(set(captum) | set(fast)):
        c, f = captum.get(nodeid, {"outcome": "missing"}), fast.get(nodeid, {"outcome": "missing"})
        row = files[nodeid.split("::")[0]]
        row["tests"] += 1
        row["captum_pass"] += c["outcome"] == "passed"
        row["fastattr_pass"] += f["outcome"] == "passed"
        row["both_pass"] += c["outcome"] == "passed" and f["outcome"] == "passed"
        row["uses_fastattr"] += bool(f.get("used"))
        row["uses_fastattr_pass"] += bool(f.get("used")) and c["outcome"] == "passed"
        row["uses_fastattr_both_pass"] += bool(f.get("used")) and c["outcome"] == f["outcome"] == "passed"
        if c["outcome"] == "passed" and f["outcome"] != "passed":
            category, reason = classify(nodeid, f.get("message", ""))
            failures.append({"test": nodeid, "outcome": f["outcome"], "category": category, "reason": reason,
                             "message": f.get("message", ""), "used_fastattr": bool(f.get("used"))})  # fmt: skip
    # a reason starting "--extra" belongs to runs with --extra classes: not stale in a run without them
    fixed = [f"{t!r} {e!r}" for t, e, _, r in KNOWN
             if not r.startswith("--extra") and not any(re.search(t, x["test"]) and re.search(e, x["message"]) for x in failures)]  # fmt: skip
    return {"files": {k: dict(v) for k, v in sorted(files.items())}, "failures": failures, "stale_known": fixed}


def summary(result: dict) -> list[str]:
    files, failures = result["files"], result["failures"]
    lines = ["", "per file (tests: collected; captum: pass with Captum alone; fastattr: of those, pass substituted;",
             "  uses: tests that construct one of fastattr's classes, and of those passing with Captum, pass substituted)", "",
             f"{'file':<58} {'tests':>5} {'captum':>6} {'fastattr':>8} {'uses':>5} {'uses ok':>7}"]  # fmt: skip
    total: Counter = Counter()
    for name, row in files.items():
        total.update(row)
        if row.get("uses_fastattr") or row.get("captum_pass") != row.get("both_pass"):
            lines.append(f"{name:<58} {row['tests']:>5} {row['captum_pass']:>6} {row['both_pass']:>8} {row['uses_fastattr']:>5}"
                         f" {row['uses_fastattr_both_pass']:>4}/{row['uses_fastattr_pass']:<3}")  # fmt: skip
    lines.append(f"{'all of tests/attr + tests/metrics':<58} {total['tests']:>5} {total['captum_pass']:>6} {total['both_pass']:>8}"
                 f" {total['uses_fastattr']:>5} {total['uses_fastattr_both_pass']:>4}/{total['uses_fastattr_pass']:<3}")  # fmt: skip
    by_cat = Counter(f["category"] for f in failures)
    lines += ["", f"tests passing with Captum alone: {total['captum_pass']}; still passing substituted: {total['both_pass']}",
              f"failing substituted: {len(failures)} ({', '.join(f'{k} {v}' for k, v in sorted(by_cat.items())) or 'none'})", ""]  # fmt: skip
    for category in ("unclassified", "fastattr-gap", "captum-internals"):
        group = [f for f in failures if f["category"] == category]
        if group:
            lines.append(f"{category}:")
            reasons = defaultdict(list)
            for f in group:
                reasons[f["reason"]].append(f["test"])
            for reason, tests in reasons.items():
                lines.append(f"  {len(tests):>3} x {reason}")
                lines += [f"        {t}" for t in tests[:3]] + ([f"        ... {len(tests) - 3} more"] if len(tests) > 3 else [])
    if result["stale_known"]:
        lines += ["", "known-failure patterns that no longer match a failure (remove them from captum_suite_known.py):"]
        lines += [f"  {p}" for p in result["stale_known"]]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captum-src", default=os.environ.get("CAPTUM_SRC", "/work/captum-src"), help="captum repository checkout")
    parser.add_argument("--paths", nargs="+", default=["tests/attr", "tests/metrics"], help="test paths inside --captum-src")
    parser.add_argument("--json", default=None, help="write every outcome and the classified failures here")
    parser.add_argument("--baseline", default=None, help="reuse the Captum-alone outcomes from an earlier --json")
    parser.add_argument("--reclassify", default=None, metavar="JSON", help="run nothing: summarize an earlier --json with today's KNOWN")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per pytest run")
    parser.add_argument("--extra", default="", help="further classes to substitute, comma-separated (e.g. LLMGradientAttribution)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments after --, e.g. -- -k saliency")
    args = parser.parse_args()
    if args.reclassify:
        with open(args.reclassify) as f:
            earlier = json.load(f)
        meta, captum_results, fast_results = earlier["meta"], earlier["captum"], earlier["fastattr_results"]
    else:
        meta, captum_results, fast_results = run_both(args)
    result = compare(captum_results, fast_results)
    print("\n".join(summary(result)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, **result, "captum": captum_results, "fastattr_results": fast_results}, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0 if all(f["category"] == "captum-internals" for f in result["failures"]) else 1


def run_both(args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """(meta, Captum-alone outcomes, substituted outcomes)."""
    import captum

    import fastattr

    src = os.path.abspath(args.captum_src)
    if not os.path.isdir(os.path.join(src, "tests", "attr")):
        raise SystemExit(f"{src} has no tests/attr: give --captum-src a checkout of the captum repository (see RESULTS.md)")
    if args.baseline:
        with open(args.baseline) as f:
            captum_results = json.load(f)["captum"]
        # only the tests under --paths (a run of one file compares that file)
        captum_results = {k: v for k, v in captum_results.items() if any(k == p or k.startswith(p.rstrip("/") + ("/" if not p.endswith(".py") else "::")) for p in args.paths)}
        print(f"[Captum alone] reused from {args.baseline}")
    else:
        captum_results = run_pytest(src, args.paths, False, args.pytest_args, args.timeout)
    fast_results = run_pytest(src, args.paths, True, args.pytest_args, args.timeout, args.extra)
    meta = {"captum_src": src, "captum_commit": _commit(src), "captum": captum.__version__, "fastattr": fastattr.__version__,
            "fastattr_commit": _commit(HERE), "extra": args.extra, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv])}  # fmt: skip
    return meta, captum_results, fast_results


def _commit(src: str) -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        path = os.path.join(src, "COMMIT")  # a snapshot without .git: the commit written beside it
        return open(path).read().strip() if os.path.exists(path) else None


if __name__ == "__main__":
    sys.exit(main())
