"""Whether the CPU default layout pays: channels_last True vs False vs the default (None), alternating in
one process, best of ``--repeats`` calls each. Saliency on 64 samples of 3x224x224 through bench_store's
NearFree (no convolution: the default is NCHW) and IG-16 on 256 samples of the demo CNN at 64 rows per
forward (convolutions: the default is channels-last). fastattr/engine.py, use_channels_last.

    python benchmarks/bench_layout_default.py [--repeats 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as h  # noqa: E402
import models  # noqa: E402
from bench_store import NearFree  # noqa: E402

import fastattr  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    near, x224, t224 = NearFree().eval(), torch.randn(64, 3, 224, 224), torch.randint(0, 10, (64,))
    cnn, x32, t32 = models.small_cnn().eval(), torch.randn(256, 3, 32, 32), torch.randint(0, 10, (256,))
    cases = {
        "NearFree (no conv) saliency": lambda cl: fastattr.Saliency(near).attribute_batch(x224, t224, True, None, True, channels_last=cl),
        "demo CNN (conv) IG-16": lambda cl: fastattr.IntegratedGradients(cnn).attribute_batch(x32, None, t32, None, 16, None, 64, True, channels_last=cl),
    }
    layouts = (True, False, None)
    result = {}
    for name, call in cases.items():
        for cl in layouts:  # warm-up
            call(cl)
        times: dict = {cl: [] for cl in layouts}
        for _ in range(args.repeats):
            for cl in layouts:
                t = time.perf_counter()
                call(cl)
                times[cl].append(time.perf_counter() - t)
        result[name] = {f"channels_last={cl}": round(min(v) * 1e3, 1) for cl, v in times.items()}
    print(h.env_line(h.env(torch.device("cpu"))), f"| load {os.getloadavg()[0]:.2f}")
    print(json.dumps({"ms_per_call_best": result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
