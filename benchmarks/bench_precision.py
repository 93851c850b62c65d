"""What precision="auto" picks, and the probe errors behind it (issue 16, item 2).

For each model, integrated gradients on ``--samples`` images through the public API:
``IntegratedGradients(model).attribute(x, precision="auto")`` (the device's candidates: fp32/bf16
on CPU, fp32/tf32/bf16/fp16 on CUDA) and, with ``--fp16``, ``precision="fp16", probe=True`` to
show fp16's error and time. Errors are the probe's: relative L2 against fp32 per sample, max and
median; times are one probe pass (the fastest of two for auto, synchronized on CUDA).

    python benchmarks/bench_precision.py --models resnet50,vit --image 64 --steps 16 --samples 4 --fp16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import card, commit, dict_table, write_json  # noqa: E402
from models import ViT, resnet50  # noqa: E402

import fastattr  # noqa: E402


def build(name: str, image: int) -> torch.nn.Module:
    if name == "resnet50":
        return resnet50(seed=0)
    if name == "vit":
        return ViT(image=image, seed=0)
    raise SystemExit(f"unknown model {name!r}: resnet50 or vit")


def probe_rows(name: str, model: torch.nn.Module, x: torch.Tensor, steps: int, device: torch.device, fp16: bool) -> list[dict]:
    with torch.no_grad():
        target = model(x).argmax(1)
    ig = fastattr.IntegratedGradients(model)
    ig.attribute(x, target=target, n_steps=steps, precision="auto", probe_samples=x.shape[0])
    auto = ig.last_probe
    rows = []
    for policy, c in auto.candidates.items():
        rows.append({"model": name, "policy": policy, "err_max": c["rel_err_max"], "err_median": c["rel_err_median"],
                     "probe_s": c["seconds"], "auto_picks": "yes" if policy == auto.policy else ""})  # fmt: skip
    if fp16 and "fp16" not in auto.candidates:
        ig.attribute(x, target=target, n_steps=steps, precision="fp16", probe=True, probe_samples=x.shape[0])
        p = ig.last_probe
        rows.append({"model": name, "policy": "fp16 (not a CPU candidate)", "err_max": p.rel_err_max, "err_median": p.rel_err_median,
                     "probe_s": p.seconds["fp16"], "auto_picks": ""})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,vit")
    ap.add_argument("--image", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--fp16", action="store_true", help="also probe fp16 where it is not an auto candidate (CPU)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.samples, 3, args.image, args.image, device=device)
    rows = []
    for name in args.models.split(","):
        model = build(name, args.image).to(device)
        rows += probe_rows(name, model, x, args.steps, device, args.fp16)
        print(dict_table([r for r in rows if r["model"] == name]), flush=True)
    print(f"\n{card(device)}, commit {commit()}; IG-{args.steps}, {args.samples} samples {args.image}x{args.image}, random init")
    if args.json:
        write_json(args.json, {"args": vars(args), "rows": rows}, device)


if __name__ == "__main__":
    main()
