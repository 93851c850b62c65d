"""The one GPU call: correctness first, then every timing, in one process, under a time budget.

    python benchmarks/gpu_suite.py --out DIR [--commit SHA] [--budget-s 420] [--only a,b] [--skip a,b]
    python benchmarks/gpu_suite.py --quick --out DIR      # CPU smoke test: every stage on tiny sizes

Stages, in this order (a stage that would start after --budget-s is recorded as skipped; a
failing stage records its traceback and the suite goes on, exiting 1 at the end):

  kernels      every Triton kernel vs its float64 torch reference, then timed vs torch (bench_kernels)
  engine       on the device: fastattr vs Captum for every Captum rule, Saliency, InputXGradient; the
               Triton vs the torch kernel path; tf32/bf16/fp16 vs fp32; a dataset run vs the in-memory API
  captum       IG side by side with Captum: MLP, CNN, ResNet-50, ViT-S/16 at every precision, each
               row's error against a float64 reference (bench_captum)
  dataset      fastattr.run vs a Captum loop, ResNet-50 at 224, saliency and IG-16: samples/s, time
               outside forward/backward, store MB/s (bench_dataset)
  store        the store alone on this machine's cores: ratio and MB/s of every compression on real
               attributions (bench_store compression), the storage reductions (float16, channel
               sums) made on the device: bytes, write rate, float16 error (bench_store reductions),
               and the writer alone on every core vs 2 encode threads (bench_store writer)
  noise        NoiseTunnel (SmoothGrad over IG) and GradientShap vs Captum (bench_noise)
  layer        LayerIntegratedGradients on a token classifier vs Captum (bench_layer)
  adaptive     n_steps="auto" vs Captum's fixed steps on the demo CNNs (bench_adaptive)
  precision    probe error vs fp32 of every policy and what precision="auto" picks, ResNet-50 vs
               ViT-S/16 (bench_precision)
  llm          language-model generations vs Captum's LLMGradientAttribution loop (bench_llm)
  distributed  torchrun on every visible GPU vs one (bench_distributed); skipped with one GPU
  kernel_tests tests/test_kernels.py on CUDA tensors (needs pytest; the --quick run takes a subset)
  compile      compile=True vs eager, IG on ResNet-50 (224 on a GPU): seconds, peak memory, error
               against eager (the default stays off until a device measures it faster) (last: minutes of compiling)

Writes DIR/gpu_suite.json (env: card, date, commit, versions; per stage: status, seconds, rows)
and DIR/gpu_suite.md (the same as tables), rewritten after every stage so a killed run keeps
what it finished. A copied tree without .git records commit "unknown": pass --commit.

--quick (CPU, or a GPU): tiny sizes and one intra-op thread (on a shared 2-core host two threads
under contention run several times slower than one); its numbers only show the stages work.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _harness as h  # noqa: E402
import bench_adaptive  # noqa: E402
import bench_captum  # noqa: E402
import bench_dataset  # noqa: E402
import bench_distributed  # noqa: E402
import bench_kernels  # noqa: E402
import bench_layer  # noqa: E402
import bench_noise  # noqa: E402
import models  # noqa: E402

import fastattr  # noqa: E402

warnings.filterwarnings("ignore")
# compile last: with dynamic=False it compiles ResNet-50 several times (minutes, unmeasured on a device),
# so it must not cost the stages after it their place in the one GPU call
STAGES = ("kernels", "engine", "captum", "dataset", "store", "noise", "layer", "adaptive", "precision", "llm", "distributed", "kernel_tests", "compile")
Result = tuple[list[Any], str]  # (rows for the JSON, markdown for the report)


class Skip(Exception):
    """A stage that cannot run here (not an error): its message is recorded."""


# --------------------------------------------------------------------------- stages


def stage_kernels(cfg: argparse.Namespace) -> Result:
    """bench_kernels in its own process: on CPU the Triton interpreter must be set before triton loads."""
    path = os.path.join(cfg.work, "kernels.json")
    env = dict(os.environ)
    argv = [sys.executable, os.path.join(HERE, "bench_kernels.py"), "--json", path]
    if cfg.device.type == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    if cfg.quick or cfg.device.type == "cpu":
        argv.append("--quick")
    subprocess.run(argv, check=True, env=env)
    if not os.path.exists(path):
        raise Skip("bench_kernels skipped itself (see its output above)")
    with open(path) as f:
        data = json.load(f)
    return data["rows"], bench_kernels.table(data["rows"], data["copy_gbps"], data["device"])


def stage_engine(cfg: argparse.Namespace) -> Result:
    from captum import attr as ca

    dev, n, steps = cfg.device, (9 if cfg.quick else 37), (8 if cfg.quick else 24)
    h.true_fp32()  # Captum's side in true fp32, like fastattr's fp32 policy
    rows: list[dict] = []
    torch.manual_seed(0)
    cnn = models.randomize_batchnorm(models.small_cnn()).eval().to(dev)
    mlp = models.mlp().eval().to(dev)
    for name, model, shape in (("mlp", mlp, (64,)), ("cnn", cnn, (3, 32, 32))):
        x = torch.randn(n, *shape, device=dev)
        t = torch.randint(0, 10, (n,), device=dev)
        for rule in fastattr.RULES[:-1]:  # Captum's rules
            a, d = fastattr.IntegratedGradients(model).attribute(x, target=t, method=rule, n_steps=steps, return_convergence_delta=True, internal_batch_size=101)
            b, e = ca.IntegratedGradients(model).attribute(x, target=t, method=rule, n_steps=steps, return_convergence_delta=True)
            rows.append({"check": f"{name} IG {rule} vs captum", "rel_l2": h.rel_err(a, b), "max_abs_diff": (a - b).abs().max().item(), "delta_diff": (d - e).abs().max().item(), "scale": b.abs().max().item()})
        for cls in ("Saliency", "InputXGradient"):
            a = getattr(fastattr, cls)(model).attribute(x, target=t)
            b = getattr(ca, cls)(model).attribute(x, target=t)
            rows.append({"check": f"{name} {cls} vs captum", "rel_l2": h.rel_err(a, b), "max_abs_diff": (a - b).abs().max().item(), "scale": b.abs().max().item()})
        tri = fastattr.IntegratedGradients(model).attribute(x, target=t, n_steps=steps, kernel_backend="triton" if dev.type == "cuda" else "torch")
        ref = fastattr.IntegratedGradients(model).attribute(x, target=t, n_steps=steps, kernel_backend="torch")
        rows.append({"check": f"{name} IG triton vs torch kernels", "max_abs_diff": (tri - ref).abs().max().item(), "scale": ref.abs().max().item()})
        rows[-1]["ok"] = (tri - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()  # judged at the end: the checks below still run
        for p in [p for p in cfg.precisions if p != "fp32"]:
            a, d = fastattr.IntegratedGradients(model).attribute(x, target=t, n_steps=steps, precision=p, return_convergence_delta=True)
            rows.append({"check": f"{name} IG {p} vs fp32", "rel_l2": h.rel_err(a, ref), "finite": bool(torch.isfinite(a).all() and torch.isfinite(d).all())})
    # a dataset run on the device (prefetch, async copies, writer thread) equals the in-memory API
    m = 40 if cfg.quick else 300
    x = torch.randn(m, 3, 32, 32)
    with tempfile.TemporaryDirectory() as tmp:
        fastattr.run(cnn, x.numpy(), tmp + "/run", target="predicted", n_steps=steps, shard_size=16 if cfg.quick else 128, examples_per_batch=8 if cfg.quick else 64, device=dev, progress=False)
        store = fastattr.open(tmp + "/run")
        got = store[0:m]
        with torch.no_grad():
            pred = cnn(x.to(dev)).argmax(1)
        ref, delta = fastattr.IntegratedGradients(cnn).attribute(x.to(dev), target=pred, n_steps=steps, return_convergence_delta=True)
        rows.append({"check": f"cnn fastattr.run on {dev.type} vs in-memory IG", "rel_l2": h.rel_err(torch.from_numpy(got["attributions"]["x"]), ref),
                     "delta_diff": float(np.abs(got["delta"] - delta.cpu().numpy()).max()), "indices_ok": bool((store.indices == np.arange(m)).all())})  # fmt: skip
    rows[-1]["ok"] = rows[-1]["indices_ok"] and rows[-1]["rel_l2"] <= 1e-5  # the dataset run equals the in-memory API
    # fp32 parity is judged normwise: cuDNN may pick other algorithms, and a last-bit difference
    # can flip a ReLU or max-pool argmax locally
    failures = [r for r in rows if ("vs captum" in r["check"] and not r["rel_l2"] <= 1e-4) or r.get("ok") is False]
    if failures:
        raise RuntimeError(f"engine checks failed: {failures}")
    return rows, h.dict_table(rows)


def stage_captum(cfg: argparse.Namespace) -> Result:
    C, cases = bench_captum.Case, bench_captum.CASES
    if cfg.quick:  # tiny: the big models at 32x32
        small, big = {"n_steps": 8, "ref_samples": 2, "ref_steps": 32}, {"n_steps": 4, "ref_samples": 1, "ref_steps": 8}  # float64 refs are slow on CPU
        plan = [
            (dataclasses.replace(cases["mlp"], samples=16, **small), (1,)),
            (dataclasses.replace(cases["cnn"], samples=4, **small), (1,)),
            (C("resnet50 3x32x32", models.resnet50, (3, 32, 32), 2, classes=1000, **big), (1,)),
            (C("vit dim 384 depth 2 3x32x32", lambda: models.ViT(image=32, depth=2), (3, 32, 32), 2, classes=1000, **big), (1,)),
        ]
    else:
        plan = [(cases["mlp"], bench_captum.SWEEP), (cases["cnn"], bench_captum.SWEEP), (cases["resnet50"], (1, 5, 25)), (cases["vit"], (1, 5, 25))]
    rows: list[h.Row] = []
    for case, sweep in plan:
        with h.stage_timer(case.name):
            rows += bench_captum.run_case(case, cfg.device, cfg.repeats, cfg.precisions, sweep)
    return rows, h.table(rows)


def stage_dataset(cfg: argparse.Namespace) -> Result:
    common = ["--device", str(cfg.device), "--model", "resnet50", "--precisions", ",".join(p for p in cfg.precisions if p in ("fp32", "bf16"))]
    if cfg.quick:
        runs = [common + ["--input-size", "32", "--methods", "saliency,ig", "--sizes", "8", "--steps", "2", "--warmup", "4"]]
    else:  # saliency is store-bound (600 KB out per sample), IG-16 model-bound: sized to about a minute each
        runs = [common + ["--methods", "saliency", "--sizes", "2048", "--warmup", "256"], common + ["--methods", "ig", "--sizes", "512", "--steps", "16", "--warmup", "64"]]
    rows, envs = [], []
    for argv in runs:
        env, r = bench_dataset.run(bench_dataset.build_parser().parse_args(argv))
        rows += r
        envs.append(env)
    targets = [  # issue 16's targets on an H100/H200
        f"- {r['impl']}, {r['samples']} samples: time outside fwd/bwd {100 * r['outside_model']:.1f}% (target < 10%: {'met' if r['outside_model'] < 0.1 else 'not met'}), "
        f"store {r['store_mb_per_s']:,.0f} MB/s raw (target >= 1,500: {'met' if r['store_mb_per_s'] >= 1500 else 'not met'})"
        for r in rows
        if r["outside_model"] is not None
    ]
    return rows, envs[0] + "\n\n" + bench_dataset.table(rows) + "\n\n" + "\n".join(targets)


def _script_table(cfg: argparse.Namespace, script: str, argv: list[str], env: dict[str, str] | None = None, tag: str = "") -> tuple[list, str]:
    """Run a bench script whose JSON holds headers + list rows (bench_store); its rows and markdown."""
    path = os.path.join(cfg.work, f"{script}-{argv[0]}{tag}.json")
    cmd = [sys.executable, os.path.join(HERE, script), *argv, "--json", path]
    if subprocess.run(cmd, env={**os.environ, **(env or {})}).returncode != 0:
        raise RuntimeError(f"{script} {argv[0]} failed (see its output above)")
    with open(path) as f:
        got = json.load(f)
    return got["rows"], got["env_line"] + "\n\n" + h.markdown(got["headers"], got["rows"])


def stage_store(cfg: argparse.Namespace) -> Result:
    """The encoder's MB/s on every core of the machine (issue 16: >= 1.5 GB/s on the device machine's 16 cores)."""
    comp = ["compression", "--levels", "1"]
    red = ["reductions", "--device", str(cfg.device), "--repeats", "1" if cfg.quick else "2"]
    red += ["--samples", "2", "--steps", "2", "--write-samples", "16"] if cfg.quick else ["--samples", "64", "--steps", "16", "--write-samples", "1024"]
    rows_c, md_c = _script_table(cfg, "bench_store.py", comp)
    rows_r, md_r = _script_table(cfg, "bench_store.py", red)
    # the writer alone: every core (pooled checksums for "none" from 4 encode threads) vs 2 encode
    # threads (HDF5's own checksum in the writer thread, the 2-core path); store/schema.py POOL_CHECKSUM_MIN_THREADS
    wr = ["writer", "--samples", "128" if cfg.quick else "4096", "--shard-size", "64" if cfg.quick else "1024", "--repeats", "1" if cfg.quick else "2"]
    rows_w, md_w = _script_table(cfg, "bench_store.py", wr)
    rows_w2, md_w2 = _script_table(cfg, "bench_store.py", wr, env={"FASTATTR_ENCODE_THREADS": "2"}, tag="-2threads")
    return [{"compression": rows_c}, {"reductions": rows_r}, {"writer": rows_w}, {"writer_2_threads": rows_w2}], "\n\n".join((md_c, md_r, md_w, md_w2))


def stage_compile(cfg: argparse.Namespace) -> Result:
    """compile=True (the engine's torch.compile'd forward) against eager, IG on ResNet-50, fp32."""
    size, n, steps = (32, 2, 2) if cfg.quick else (224, 32, 16)
    torch.manual_seed(0)
    model = models.resnet50().to(cfg.device).eval()
    x = torch.randn(n, 3, size, size, device=cfg.device)
    ig = fastattr.IntegratedGradients(model)
    rows: list[dict] = []
    eager = None
    for label, kw in (("eager", {}), ("compile=True", {"compile": True})):
        t0 = time.perf_counter()
        ig.attribute(x, target=0, n_steps=steps, **kw)  # warm-up; compile=True compiles here
        first = time.perf_counter() - t0
        seconds, peak, got = h.measure_once(lambda kw=kw: ig.attribute(x, target=0, n_steps=steps, **kw), cfg.device, memory_on=cfg.device)
        eager = got if eager is None else eager
        rows.append({"impl": label, "samples": n, "steps": steps, "image": size, "first call (s)": round(first, 2),
                     "seconds": round(seconds, 3), "x vs eager": round(rows[0]["seconds"] / seconds, 2) if rows else 1.0,
                     "peak MiB": peak, "rel. L2 vs eager": h.rel_err(got, eager)})  # fmt: skip
    return rows, h.dict_table(rows)


def stage_noise(cfg: argparse.Namespace) -> Result:
    if cfg.quick:
        argv = ["--samples", "4", "--nt-samples", "2", "--steps", "4", "--n-samples", "4", "--references", "4", "--ref-samples", "2", "--ref-steps", "16"]
    else:
        argv = ["--samples", "64", "--ref-samples", "4", "--ref-steps", "256"]
    args = bench_noise.build_parser().parse_args(argv + ["--device", str(cfg.device), "--repeats", str(cfg.repeats)])
    args.precisions = cfg.precisions
    rows = bench_noise.run(args)
    return rows, h.table(rows)


def stage_layer(cfg: argparse.Namespace) -> Result:
    if cfg.quick:
        rows = bench_layer.run(str(cfg.device), 4, 8, cfg.repeats, cfg.precisions, ref_samples=2, ref_steps=32, sweep=(1,))
    else:
        rows = bench_layer.run(str(cfg.device), 256, 50, cfg.repeats, cfg.precisions, sweep=(1, 5, 25))
    return rows, h.table(rows)


def stage_adaptive(cfg: argparse.Namespace) -> Result:
    if cfg.quick:
        argv = ["--samples", "4", "--ref-samples", "2", "--ref-steps", "64", "--tolerances", "0.1", "--captum-steps", "8", "--rules", "simpson",
                "--precisions", "fp32", "--models", "relu_cnn", "--train-samples", "64", "--max-steps", "17"]  # fmt: skip
    else:
        argv = ["--samples", "256", "--ref-samples", "16", "--ref-steps", "1024", "--tolerances", "0.1,0.03,0.01,0.001", "--captum-steps", "16,32,50,64,128",
                "--precisions", ",".join(p for p in cfg.precisions if p in ("fp32", "bf16"))]  # fmt: skip
    args = bench_adaptive.parse(argv + ["--device", str(cfg.device), "--repeats", str(cfg.repeats)])
    points, _ = bench_adaptive.run(args)
    return points, bench_adaptive.table(points) + "\n\n" + "\n".join(bench_adaptive.target_lines(points))


def _script_rows(cfg: argparse.Namespace, script: str, argv: list[str]) -> list[dict]:
    """Run a bench script that writes its own JSON (in a child: it sets its own threads and flags)."""
    path = os.path.join(cfg.work, script.replace(".py", ".json"))
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), script), *argv, "--json", path]
    if subprocess.run(cmd).returncode != 0:
        raise RuntimeError(f"{script} failed (see its output above)")
    with open(path) as f:
        return json.load(f)["rows"]


def stage_precision(cfg: argparse.Namespace) -> Result:
    """Probe error vs fp32 of every policy and what precision='auto' picks (ResNet-50 vs ViT-S/16)."""
    argv = ["--models", "vit", "--image", "32", "--steps", "4", "--samples", "2"] if cfg.quick else ["--image", "224", "--steps", "16", "--samples", "4"]
    rows = _script_rows(cfg, "bench_precision.py", argv + ["--device", str(cfg.device)])
    return rows, h.dict_table(rows)


def stage_llm(cfg: argparse.Namespace) -> Result:
    """Language-model generations vs Captum's LLMGradientAttribution loop (GPU size: ~86M parameters, 32 prompts)."""
    argv = ["--quick", "--no-inseq", "--models", "gpt2"] if cfg.quick else ["--gpu-size", "--no-inseq", "--threads", str(os.cpu_count() or 1)]
    rows = _script_rows(cfg, "bench_llm.py", argv + ["--device", str(cfg.device)])
    return rows, h.dict_table(rows)


def stage_distributed(cfg: argparse.Namespace) -> Result:
    path = os.path.join(cfg.work, "distributed.json")
    if cfg.device.type == "cuda":
        k = torch.cuda.device_count()
        if k < 2:
            raise Skip(f"{k} GPU visible: scaling needs several")
        argv = ["--device", "cuda", "--ranks", f"1,{k}", "--samples", "16384", "--steps", "32"]
    else:  # only checks that the launch and the store comparison work: the ranks share the cores
        argv = ["--device", "cpu", "--ranks", "1,2", "--samples", "64", "--steps", "2"]
    if bench_distributed.main(argv + ["--out", path]) != 0:
        raise RuntimeError("bench_distributed failed (see its output above)")
    with open(path) as f:
        rows = json.load(f)["rows"]
    return rows, h.dict_table([{k: v for k, v in r.items() if k != "vs_1_rank"} | r.get("vs_1_rank", {}) for r in rows])


def stage_kernel_tests(cfg: argparse.Namespace) -> Result:
    if importlib.util.find_spec("pytest") is None:
        raise Skip("pytest is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1" if cfg.device.type == "cpu" else "0")
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(HERE, "..", "tests", "test_kernels.py")]
    if cfg.quick:
        argv += ["-k", "shared or first_sum"]
    r = subprocess.run(argv, env=env, capture_output=True, text=True)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-500:]
    print(r.stdout[-3000:], flush=True)
    if r.returncode != 0:
        raise RuntimeError(f"tests/test_kernels.py failed: {tail}")
    return [{"pytest": tail}], f"tests/test_kernels.py: {tail}"


# --------------------------------------------------------------------------- driver


def write_report(cfg: argparse.Namespace, info: dict, results: dict) -> None:
    h.write_json(os.path.join(cfg.out, "gpu_suite.json"), {"env": info, "mode": "quick" if cfg.quick else "full", "budget_s": cfg.budget_s, "stages": results})
    lines = [
        f"# fastattr GPU suite{' (--quick: sizes too small for the numbers to mean anything)' if cfg.quick else ''}",
        "",
        f"- card: {info['card']}",
        f"- date: {info['date']}",
        f"- commit: {info['commit']}",
        f"- torch {info['torch']}, triton {info['triton']}, captum {info['captum']}, {info['threads']} CPU threads",
        "",
        "| stage | status | seconds |",
        "| --- | --- | ---: |",
    ]
    lines += [f"| {name} | {r['status']}{': ' + r['message'] if r.get('message') else ''} | {r['seconds']:.0f} |" for name, r in results.items()]
    for name, r in results.items():
        if r.get("table"):
            lines += ["", f"## {name}", "", r["table"]]
    with open(os.path.join(cfg.out, "gpu_suite.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--out", default=".", help="folder for gpu_suite.json and gpu_suite.md")
    parser.add_argument("--quick", action="store_true", help="tiny sizes; runs on CPU when there is no GPU")
    parser.add_argument("--device", default=None, help="default: cuda when available (--quick: else cpu)")
    parser.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD, or FASTATTR_COMMIT)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no stage after this many seconds")
    parser.add_argument("--only", default="", help="comma-separated stages to run: " + ",".join(STAGES))
    parser.add_argument("--skip", default="", help="comma-separated stages to skip")
    cfg = parser.parse_args(argv)
    cfg.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() or not cfg.quick else "cpu"))
    if cfg.device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: the GPU suite needs one (or --quick for the CPU smoke test)")
        return 2
    if cfg.commit:
        os.environ["FASTATTR_COMMIT"] = cfg.commit
    if cfg.quick and cfg.device.type == "cpu":
        torch.set_num_threads(1)
    cfg.precisions = ["fp32", "tf32", "bf16", "fp16"] if cfg.device.type == "cuda" else ["fp32", "bf16"]
    cfg.repeats = 1 if cfg.quick else 2
    only, skip = set(filter(None, cfg.only.split(","))), set(filter(None, cfg.skip.split(",")))
    unknown = (only | skip) - set(STAGES)
    if unknown:
        parser.error(f"unknown stage(s) {sorted(unknown)}; stages: {','.join(STAGES)}")
    os.makedirs(cfg.out, exist_ok=True)
    info = h.env(cfg.device)
    print(h.env_line(info), flush=True)
    stages: dict[str, Callable[[argparse.Namespace], Result]] = {name: globals()[f"stage_{name}"] for name in STAGES}
    results: dict[str, dict] = {}
    status, t_start = 0, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastattr-suite-") as work:
        cfg.work = work
        for name, fn in stages.items():
            if (only and name not in only) or name in skip:
                continue
            elapsed = time.perf_counter() - t_start
            if elapsed > cfg.budget_s:
                results[name] = {"status": "skipped", "message": f"over the time budget ({elapsed:.0f} s > {cfg.budget_s:.0f} s)", "seconds": 0.0}
                continue
            print(f"\n== {name}", flush=True)
            t0 = time.perf_counter()
            try:
                rows, md = fn(copy.copy(cfg))
                results[name] = {"status": "ok", "rows": rows, "table": md}
                print(md, flush=True)
            except Skip as e:
                results[name] = {"status": "skipped", "message": str(e)}
                print(f"   skipped: {e}", flush=True)
            except Exception as e:
                traceback.print_exc()
                results[name] = {"status": "error", "message": f"{type(e).__name__}: {str(e)[:300]}", "traceback": traceback.format_exc()}
                status = 1
            if cfg.device.type == "cuda":
                torch.cuda.empty_cache()
            results[name]["seconds"] = time.perf_counter() - t0
            print(f"== {name}: {results[name]['status']} in {results[name]['seconds']:.0f} s", flush=True)
            write_report(cfg, info, results)
    write_report(cfg, info, results)
    print(f"\nsuite: {time.perf_counter() - t_start:.0f} s; wrote {os.path.join(cfg.out, 'gpu_suite.json')} and gpu_suite.md", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
