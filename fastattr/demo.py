"""The embedded demo: a dataset where the right attribution is known, end to end.

Each 1x24x24 image is Gaussian noise with one 4x4 patch, at a random place, holding
one of four class patterns; the class is decided by the patch alone. A small CNN is
trained on it in seconds, then integrated gradients attribute every test sample.
Because the deciding region is known per sample, the share of attribution mass that
falls inside it measures whether the attributions are right (a random attribution
puts 16/576 = 2.8% there).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from .methods import IntegratedGradients, Saliency

logger = logging.getLogger(__name__)

SIZE, PATCH, CLASSES = 24, 4, 4


def _patterns() -> torch.Tensor:
    r = torch.arange(PATCH)
    horizontal = (r[:, None] % 2 * 2 - 1).expand(PATCH, PATCH)
    vertical = horizontal.T
    checker = ((r[:, None] + r[None, :]) % 2 * 2 - 1)
    ring = torch.ones(PATCH, PATCH)
    ring[1:-1, 1:-1] = -1
    return torch.stack([horizontal, vertical, checker, ring]).float() * 1.5


def make_dataset(n: int, seed: int = 0, noise: float = 0.6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images (n,1,24,24), labels (n,), masks (n,1,24,24) bool of the deciding patch)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, SIZE, SIZE, generator=g) * noise
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    rows = torch.randint(0, SIZE - PATCH + 1, (n,), generator=g)
    cols = torch.randint(0, SIZE - PATCH + 1, (n,), generator=g)
    masks = torch.zeros(n, 1, SIZE, SIZE, dtype=torch.bool)
    patterns = _patterns()
    for i in range(n):
        r, c = int(rows[i]), int(cols[i])
        images[i, 0, r : r + PATCH, c : c + PATCH] = patterns[labels[i]] + torch.randn(PATCH, PATCH, generator=g) * 0.1
        masks[i, 0, r : r + PATCH, c : c + PATCH] = True
    return images, labels, masks


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(16, CLASSES),
    )


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int = 4, seed: int = 0) -> float:
    """Adam on minibatches; returns the final training accuracy."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(images)).split(64):
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def mass_inside(attr: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-sample share of |attribution| inside the mask."""
    a = attr.abs().flatten(1)
    return (a * masks.flatten(1)).sum(1) / a.sum(1).clamp_min(1e-30)


@dataclass
class DemoReport:
    train_accuracy: float
    test_accuracy: float
    samples: int
    seconds: float
    median_rel_residual: float
    max_abs_residual: float
    mass_ig: float
    mass_saliency: float
    mass_random: float

    def lines(self) -> list[str]:
        return [
            f"model: train accuracy {self.train_accuracy:.1%}, test accuracy {self.test_accuracy:.1%}",
            f"integrated gradients: {self.samples} samples in {self.seconds:.2f} s ({self.samples / self.seconds:,.0f} samples/s)",
            f"completeness residual |sum(attr) - (F(x) - F(x0))|: median {self.median_rel_residual:.2e} of |F(x) - F(x0)|, max {self.max_abs_residual:.2e}",
            "share of attribution mass inside the deciding 4x4 patch (higher is better):",
            f"  integrated gradients {self.mass_ig:6.1%}",
            f"  saliency             {self.mass_saliency:6.1%}",
            f"  random attribution   {self.mass_random:6.1%}   (the patch covers {PATCH * PATCH / SIZE**2:.1%} of the image)",
        ]


def run_demo(samples: int = 2000, train_samples: int = 4000, n_steps: int = 32, precision: str = "fp32", device: str = "cpu", seed: int = 0) -> DemoReport:
    torch.manual_seed(seed)
    train_x, train_y, _ = make_dataset(train_samples, seed=seed)
    test_x, test_y, test_masks = make_dataset(samples, seed=seed + 1)
    model = make_model()
    logger.info("training the demo CNN on %d synthetic images", train_samples)
    train_acc = train(model, train_x, train_y)
    model = model.to(device)
    test_x, test_y = test_x.to(device), test_y.to(device)
    with torch.no_grad():
        test_acc = float((model(test_x).argmax(1) == test_y).float().mean())
    ig = IntegratedGradients(model)
    start = time.perf_counter()
    attr, delta = ig.attribute(test_x, target=test_y, n_steps=n_steps, return_convergence_delta=True, precision=precision)
    if test_x.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        logits = model(test_x).gather(1, test_y[:, None]).squeeze(1)
        logits0 = model(torch.zeros_like(test_x)).gather(1, test_y[:, None]).squeeze(1)
    rel = (delta.abs() / (logits - logits0).abs().clamp_min(1e-6)).cpu()
    sal = Saliency(model).attribute(test_x, target=test_y)
    random_attr = torch.rand(test_x.shape, generator=torch.Generator().manual_seed(seed))
    masks = test_masks.to(device)
    return DemoReport(
        train_accuracy=train_acc,
        test_accuracy=test_acc,
        samples=samples,
        seconds=seconds,
        median_rel_residual=float(rel.median()),
        max_abs_residual=float(delta.abs().max()),
        mass_ig=float(mass_inside(attr, masks).mean()),
        mass_saliency=float(mass_inside(sal, masks).mean()),
        mass_random=float(mass_inside(random_attr, test_masks).mean()),
    )
