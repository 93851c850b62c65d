"""Small deterministic models for fastattr's tests (seeded init, eval mode, CPU).

Every factory seeds its own generator, so a model built twice is identical and no
test depends on the global RNG state or on test order.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


class MLP(nn.Module):
    """12 -> 32 -> 32 -> 5, ReLU."""

    def __init__(self, sizes: tuple[int, ...] = (12, 32, 32, 5), act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(act())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """(B, 3, 8, 8) -> conv/BN/ReLU x2 -> pool -> 4 classes; BN in eval mode with random running stats."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 4)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.flatten(1))


class TwoInput(nn.Module):
    """forward(x1 (B, 6), x2 (B, 2, 4)) -> 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x1) + self.b(x2.flatten(1)))
        return self.out(h)


class TwoInputFirstOnly(TwoInput):
    """Like TwoInput but the output ignores x2 (no gradient for the second input)."""

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.a(x1)))


class WithArgs(nn.Module):
    """forward(x (B, 10), mask (B, 10), scale: float) -> 3 classes; mask multiplies the input."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MLP((10, 16, 3), act=nn.Tanh)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.net(x * mask) * scale


class TinyTransformer(nn.Module):
    """(B, T, D) float token embeddings -> LN + single-head self-attention + GELU MLP block -> mean pool -> 3."""

    def __init__(self, d: int = 8, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.head = nn.Linear(d, classes)
        self.d = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.d), dim=-1)
        x = x + self.proj(att @ v)
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(1))


class MultiDimOut(nn.Module):
    """(B, 10) -> (B, 3, 4); targets are (i, j) tuples."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MLP((10, 16, 12), act=nn.Tanh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(-1, 3, 4)


class SingleOutput(nn.Module):
    """(B, 6) -> (B,) (or (B, 1) with keepdim=True); target=None."""

    def __init__(self, keepdim: bool = False) -> None:
        super().__init__()
        self.net = MLP((6, 16, 1), act=nn.Tanh)
        self.keepdim = keepdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return y if self.keepdim else y.squeeze(1)


class Linear(nn.Module):
    """f(x) = w . x + c, scalar output per example."""

    def __init__(self, n: int = 7) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1.5, 2.0, n))
        self.c = nn.Parameter(torch.tensor(0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w + self.c


class Smooth(nn.Module):
    """Smooth scalar model (tanh/GELU) for completeness/convergence checks."""

    def __init__(self, n: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n, 16)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.gelu(self.fc2(torch.tanh(self.fc1(x))))).squeeze(1)


class Constant(nn.Module):
    """Output does not depend on the input."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.arange(3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], 3) + 0 * x.sum().detach()


class Detaching(nn.Module):
    """Detaches the input before computing the output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.detach())


# Captum's analytic models, copied from captum/testing/helpers/basic_models.py (captum 0.9).


class BasicModel(nn.Module):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        input = 1 - F.relu(1 - input)
        return input


class BasicModel2(nn.Module):
    """Example model one from https://arxiv.org/pdf/1703.01365.pdf: f(x1, x2) = RELU(ReLU(x1) - 1 - ReLU(x2))."""

    def forward(self, input1: torch.Tensor, input2: torch.Tensor) -> torch.Tensor:
        relu_out1 = F.relu(input1)
        relu_out2 = F.relu(input2)
        return F.relu(relu_out1 - 1 - relu_out2)


class BasicModel3(nn.Module):
    """Example model two from https://arxiv.org/pdf/1703.01365.pdf: f(x1, x2) = RELU(ReLU(x1 - 1) - ReLU(x2))."""

    def forward(self, input1: torch.Tensor, input2: torch.Tensor) -> torch.Tensor:
        relu_out1 = F.relu(input1 - 1)
        relu_out2 = F.relu(input2)
        return F.relu(relu_out1 - relu_out2)


class BasicModel4_MultiArgs(nn.Module):
    """f(x1, x2) = RELU(ReLU(x1 - 1) - ReLU(x2) / x3)[:, x4]."""

    def forward(self, input1, input2, additional_input1, additional_input2: int = 0):
        relu_out1 = F.relu(input1 - 1)
        relu_out2 = F.relu(input2)
        relu_out2 = relu_out2.div(additional_input1)
        return F.relu(relu_out1 - relu_out2)[:, additional_input2]


# ----------------------------------------------------------------------------- factories


def make(name: str, seed: int = 0) -> nn.Module:
    """Build a model by name with a fixed seed, in eval mode."""
    _seeded(seed)
    model = {
        "mlp": MLP,
        "cnn": CNN,
        "two_input": TwoInput,
        "two_input_first_only": TwoInputFirstOnly,
        "with_args": WithArgs,
        "transformer": TinyTransformer,
        "multi_dim": MultiDimOut,
        "single": SingleOutput,
        "single_keepdim": lambda: SingleOutput(keepdim=True),
        "linear": Linear,
        "smooth": Smooth,
        "constant": Constant,
        "detaching": Detaching,
        "basic": BasicModel,
        "basic2": BasicModel2,
        "basic3": BasicModel3,
        "basic4": BasicModel4_MultiArgs,
    }[name]()
    return model.eval()


# input shapes per sample, and number of classes (None: no class dim / tuple target)
SHAPES: dict[str, tuple[tuple[int, ...], ...]] = {
    "mlp": ((12,),),
    "cnn": ((3, 8, 8),),
    "two_input": ((6,), (2, 4)),
    "with_args": ((10,),),
    "transformer": ((5, 8),),
    "multi_dim": ((10,),),
    "single": ((6,),),
    "single_keepdim": ((6,),),
    "smooth": ((8,),),
}

CLASSES = {"mlp": 5, "cnn": 4, "two_input": 4, "with_args": 3, "transformer": 3}


def make_inputs(name: str, batch: int = 4, seed: int = 1, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Random inputs for model ``name`` (a tuple, one tensor per forward input)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, *shape, generator=g, dtype=dtype) for shape in SHAPES[name])


def make_mask(batch: int = 4, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 10, generator=g) > 0.3).float() * 1.5


# ----------------------------------------------------------------------------- comparison helpers


def as_tuple(t):
    return t if isinstance(t, tuple) else (t,)


def assert_attr_close(got, ref, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Attributions (tensor or tuple) equal to rounding: atol is scaled by the reference's magnitude."""
    got, ref = as_tuple(got), as_tuple(ref)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype, (g.shape, r.shape, g.dtype, r.dtype)
        scale = max(float(r.abs().max()), 1e-3) if r.numel() else 1.0
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol * scale)


def rel_l2(got, ref) -> float:
    """Relative L2 error over all attribution tensors together."""
    got, ref = as_tuple(got), as_tuple(ref)
    num = sum(float((g.double() - r.double()).square().sum()) for g, r in zip(got, ref))
    den = sum(float(r.double().square().sum()) for r in ref)
    return math.sqrt(num / max(den, 1e-30))


class CallCounter(torch.nn.Module):
    """The MLP, counting its forward calls (tests that errors come before any model work)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = make("mlp")
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)
