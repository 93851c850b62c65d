"""Storage reductions of a dataset run: channel-reduced image maps and float16, made on the device.

An image attribution of shape (C, H, W) is stored as one (H, W) map (a third of the bytes for RGB):
the channel dim, dim 0 of each sample (dim 1 of a batch), is reduced on the device by
``kernels.channel_reduce`` (Triton on CUDA, the torch reference elsewhere) right after the engine
returns, before the device-to-host copy. It applies to every attributed input of the run, and only
to methods that attribute the inputs; every such input needs a channel dim (at least 3 dims per
sample: (C, H, W), (C, D, H, W), ...). The per-sample stats (sum, l1, l2, absmax, nonfinite) and the
completeness delta are computed by the engine from the full attributions, before the reduction.

``storage_dtype="float16"``: the cast happens on the device too (``StoredForm``), which halves the
device-to-host bytes and is about 20x faster than numpy's float32 -> float16 cast in the writer
thread (114 MB/s on the 2-core machine, slower than lzf). Values beyond float16's 65504 become
inf; they are counted per sample here, exactly, and added to stats/nonfinite (counted as stored).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels
from .errors import OptionError

__all__ = ["AS_COMPUTED", "CHANNEL_REDUCE_MODES", "INPUT_METHODS", "StoredForm", "channel_reduce_config", "reduce_channels"]

# "sum": the signed sum over channels (a "sum" map's total equals the full map's);
# "abs": sum of |a| over channels; "l2": the channels' Euclidean norm.
CHANNEL_REDUCE_MODES = ("sum", "abs", "l2")
# Methods whose stored attributions have the inputs' shapes (the others store layers, pooled activations or tokens).
INPUT_METHODS = ("integrated_gradients", "saliency", "input_x_gradient", "noise_tunnel", "gradient_shap")
F16_MAX = float(torch.finfo(torch.float16).max)  # 65504: smaller magnitudes never become inf
STATS_NOTE = "stats/* and delta are computed from the full attributions, before the reduction"


def channel_reduce_config(mode: str | None, method: str, shapes: list[tuple[int, ...]]) -> dict | None:
    """Check ``channel_reduce`` for a run of ``method`` over attributed inputs of per-sample ``shapes``;
    returns what the manifest's config records (None: no reduction). Raises OptionError naming the input."""
    if mode is None:
        return None
    if not isinstance(mode, str) or mode not in CHANNEL_REDUCE_MODES:
        raise OptionError(f"channel_reduce must be None or one of {', '.join(map(repr, CHANNEL_REDUCE_MODES))}, got {mode!r}")
    if method not in INPUT_METHODS:
        raise OptionError(
            f"channel_reduce applies to methods that attribute the inputs ({', '.join(INPUT_METHODS)}); "
            f"method {method!r} stores other attributions: leave channel_reduce unset"
        )
    for i, shape in enumerate(shapes):
        if len(shape) < 3:
            raise OptionError(
                f"channel_reduce={mode!r} needs a channel dim on every attributed input (at least 3 dims per sample, "
                f"channels first: (C, H, W)); input {i} has per-sample shape {tuple(shape)}: leave channel_reduce unset for this data"
            )
    return {
        "mode": mode,
        "dim": 0,  # of each sample: (C, H, W) -> (H, W)
        "input_shapes": [list(s) for s in shapes],  # per sample, before the reduction
        "stored_shapes": [list(s[1:]) for s in shapes],
        "stats": STATS_NOTE,
    }


def reduce_channels(a: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, C, *spatial) -> (B, *spatial) float32, on a's device, accumulated in fp32."""
    moved = a.detach().movedim(1, -1)
    if moved.is_contiguous():  # channels-last memory (the engine's working layout for images): no copy
        return kernels.channel_reduce(moved, moved.dim() - 1, mode, out_dtype=torch.float32)
    return kernels.channel_reduce(a.detach().contiguous(), 1, mode, out_dtype=torch.float32)


@dataclass(frozen=True)
class StoredForm:
    """What a run stores of each attribution tensor, made on the device before the host copy."""

    channel_reduce: str | None = None
    float16: bool = False

    def apply(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the tensor to copy to the host, and with float16 the per-sample count of values the cast
        made non-finite: finite before, inf after)."""
        out = reduce_channels(a, self.channel_reduce) if self.channel_reduce else a.detach().float()
        if not self.float16:
            return out, None
        half = out.to(torch.float16)
        if out.device.type == "cpu" and out.numel():  # aminmax is one fast pass; NaN fails the test and is counted below
            lo, hi = torch.aminmax(out)
            if bool((hi < F16_MAX) & (lo > -F16_MAX)):
                return half, torch.zeros(out.shape[0], dtype=torch.int64)
        # on CUDA always counted: no host sync, and memory-bound passes cost little there
        made = (torch.isinf(half) & torch.isfinite(out)).reshape(out.shape[0], -1).sum(1)
        return half, made


AS_COMPUTED = StoredForm()  # float32, every channel
