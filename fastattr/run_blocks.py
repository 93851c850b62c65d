"""A batch's results on their way to the store: device tensors -> host copies -> one Block.

The run loop (fastattr/run_loop.py) starts the device-to-host copies of a batch as soon as the
engine returns (``to_host``, asynchronous into pinned memory on CUDA) and hands the previous
batch to the writer (``write_block``) while the device works on the next one. ``write_block`` is
also where a run's non-finite accounting meets the store: every non-finite value of a sample's
results is counted in stats/nonfinite, and without allow_nonfinite the run stops naming them.
"""

from __future__ import annotations

import logging
import weakref

import numpy as np
import torch

from .errors import NonFiniteError
from .methods import BatchResult
from .run_inputs import ALLOW_HINT, nonfinite_counts, samples
from .run_reduce import AS_COMPUTED, StoredForm
from .store import Block, RunWriter

logger = logging.getLogger(__name__)
_overflow_warned: weakref.WeakSet = weakref.WeakSet()  # writers that logged a float16 overflow


def to_host(res: BatchResult, dev: torch.device, form: StoredForm = AS_COMPUTED) -> dict:
    """Start asynchronous device-to-host copies of everything a block needs; ``form``: the
    attributions are channel-reduced and / or cast to float16 on the device first (fastattr/run_reduce.py)."""
    pin = dev.type == "cuda"

    def host(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if not pin:
            return t.detach()
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return buf.copy_(t.detach(), non_blocking=True)

    stored = [form.apply(a) for a in res.attributions]
    copied = {
        "attributions": [host(t) for t, _ in stored],
        "cast_nonfinite": host(sum(m for _, m in stored)) if form.float16 else None,  # type: ignore[arg-type]
        "stats": {k: host(getattr(res.stats, k)) for k in ("sum", "l1", "l2", "absmax", "nonfinite")},
        "output": host(res.output),
        "baseline_output": host(res.baseline_output),
        "delta": host(res.delta),
        "target": host(res.target),
        "n_steps": host(res.n_steps) if isinstance(res.n_steps, torch.Tensor) else res.n_steps,
        "names": res.names,
        "extras": {k: host(v) for k, v in res.extras.items()},
    }
    if pin:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(dev))  # the copies' stream: dev's, which need not be the current device's
        copied["event"] = event
    return copied


def write_block(writer: RunWriter, start: int, stop: int, c: dict, deltas: list, rels: list, allow_nonfinite: bool) -> None:
    if "event" in c:
        c["event"].synchronize()
    rows = stop - start
    nan = np.full(rows, np.nan, dtype=np.float32)

    def f32(t: torch.Tensor | None) -> np.ndarray:
        return nan if t is None else t.float().numpy()

    names = c["names"] or (["x"] if len(c["attributions"]) == 1 else [f"input_{i}" for i in range(len(c["attributions"]))])
    n_steps = c["n_steps"].numpy().astype(np.int32) if isinstance(c["n_steps"], torch.Tensor) else np.full(rows, c["n_steps"], dtype=np.int32)
    target = c["target"]
    target_np = np.full(rows, -1, dtype=np.int64) if target is None else target.numpy().astype(np.int64)
    if target_np.ndim == 2 and target_np.shape[1] == 1:
        target_np = target_np[:, 0]
    stats = {k: (v.numpy().astype(np.int32) if k == "nonfinite" else v.float().numpy()) for k, v in c["stats"].items()}
    # stats/nonfinite counts every non-finite value of the sample's results, not only its attributions
    computed = {k: (c[k].float().numpy() if c[k] is not None else None) for k in ("output", "baseline_output", "delta")}
    stats["nonfinite"], what = nonfinite_counts(stats["nonfinite"], c.get("predicted_nonfinite"), **computed)
    if what:
        bad = start + np.nonzero(stats["nonfinite"])[0]
        if not allow_nonfinite:
            raise NonFiniteError(f"{samples(bad)}: non-finite results (sample {bad[0]}: {what}); fix the model or data, or {ALLOW_HINT}")
        logger.warning("%s: non-finite results stored (sample %d: %s), counted in stats/nonfinite", samples(bad), bad[0], what)
    if c.get("cast_nonfinite") is not None:  # float16 made on the device: values it overflowed are counted as stored, the run goes on
        made = c["cast_nonfinite"].numpy().astype(np.int32)
        stats["nonfinite"] = stats["nonfinite"] + made
        if made.any() and writer not in _overflow_warned:  # once per writer, like the store's own cast (store/shard.py)
            _overflow_warned.add(writer)
            logger.warning("%s: attribution values beyond the float16 range are stored as inf and counted in stats/nonfinite "
                           "(fastattr verify fails on them); use storage_dtype='float32' to keep them", samples(start + np.flatnonzero(made)))  # fmt: skip
    block = Block(
        start=start,
        stop=stop,
        attributions={n: a.numpy() for n, a in zip(names, c["attributions"])},
        target=target_np,
        output=f32(c["output"]),
        baseline_output=f32(c["baseline_output"]),
        delta=f32(c["delta"]),
        n_steps=n_steps,
        stats=stats,
        extras={k: v.numpy() for k, v in c["extras"].items()},
    )
    writer.put(block)
    if c["delta"] is not None:
        d = np.abs(block.delta)
        deltas.append(d)
        rels.append(d / np.maximum(np.abs(block.output - block.baseline_output), 1e-12))
