"""The embedded demo: a dataset where the right attribution is known, end to end.

Each 1x24x24 image is Gaussian noise with one 4x4 patch, at a random place, holding
one of four class patterns; the class is decided by the patch alone. A small CNN is
trained on it in seconds, then a dataset run (fastattr.run) attributes every test sample
with integrated gradients into HDF5 shards, which are read back shard by shard.
Because the deciding region is known per sample, the share of attribution mass that
falls inside it measures whether the attributions are right (a random attribution
puts 16/576 = 2.8% there).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import OptionError
from .methods import Saliency

logger = logging.getLogger(__name__)

SIZE, PATCH, CLASSES = 24, 4, 4
DEMO_FILES = ("inputs.npy", "masks.npy")  # written next to the demo's shards; they mark a directory as the demo's


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


def trained_model(train_samples: int = 4000, seed: int = 0) -> nn.Module:
    """The demo CNN trained exactly as run_demo trains it (same seed and data, so the same weights
    on CPU): a model factory for ``fastattr audit --model fastattr.demo:trained_model``."""
    torch.manual_seed(seed)
    train_x, train_y, _ = make_dataset(train_samples, seed=seed)
    model = make_model()
    train(model, train_x, train_y)  # run_demo trains with train()'s own default seed
    return model


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
    run_dir: str = ""

    def lines(self) -> list[str]:
        return [
            f"model: train accuracy {self.train_accuracy:.1%}, test accuracy {self.test_accuracy:.1%}",
            f"integrated gradients: {self.samples} samples in {self.seconds:.2f} s ({self.samples / self.seconds:,.0f} samples/s), shards in {self.run_dir}",
            f"completeness residual |sum(attr) - (F(x) - F(x0))|: median {self.median_rel_residual:.2e} of |F(x) - F(x0)| (relative), "
            f"max {self.max_abs_residual:.2e} (absolute, in logits)",
            "share of attribution mass inside the deciding 4x4 patch (higher is better):",
            f"  integrated gradients {self.mass_ig:6.1%}",
            f"  saliency             {self.mass_saliency:6.1%}",
            f"  random attribution   {self.mass_random:6.1%}   (the patch covers {PATCH * PATCH / SIZE**2:.1%} of the image)",
            f"inspect: fastattr info {self.run_dir}; fastattr verify {self.run_dir}",
            f"picture: fastattr render {self.run_dir} --data {os.path.join(self.run_dir, 'inputs.npy')} --index 0:{min(16, self.samples)} --out demo.png",
        ]


def run_demo(
    samples: int = 2000,
    train_samples: int = 4000,
    n_steps: int = 32,
    precision: str = "fp32",
    device: str = "cpu",
    seed: int = 0,
    out: str | None = None,
) -> DemoReport:
    """Train the demo CNN, attribute the test set with a dataset run into shards under
    ``out`` (a fresh temporary directory by default), and score the stored attributions
    against the known deciding patches, streaming them back shard by shard."""
    from .runner import run
    from .store import open_run

    if out is not None and os.path.isdir(out) and os.listdir(out) and not all(os.path.isfile(os.path.join(out, f)) for f in DEMO_FILES):
        # the demo replaces its directory (overwrite=True): only a previous demo's, never a run of the user's own
        raise OptionError(f"{out} is not empty and holds no earlier demo (its {' and '.join(DEMO_FILES)}): the demo replaces its --out "
                          "directory, so give a new or empty one, or a previous demo's")
    torch.manual_seed(seed)
    train_x, train_y, _ = make_dataset(train_samples, seed=seed)
    test_x, test_y, test_masks = make_dataset(samples, seed=seed + 1)
    model = make_model()
    logger.info("training the demo CNN on %d synthetic images", train_samples)
    train_acc = train(model, train_x, train_y)
    model = model.to(device)
    with torch.no_grad():
        test_acc = float((model(test_x.to(device)).argmax(1).cpu() == test_y).float().mean())
    out = out or tempfile.mkdtemp(prefix="fastattr-demo-")
    summary = run(model, test_x.numpy(), out, target=test_y.numpy(), n_steps=n_steps, precision=precision, device=device, overwrite=True)
    np.save(os.path.join(out, "inputs.npy"), test_x.numpy())  # for `fastattr render --data`
    np.save(os.path.join(out, "masks.npy"), test_masks.numpy())  # the deciding patches, for `fastattr audit --masks`
    inside, rel, max_abs = [], [], 0.0
    with open_run(out) as store:
        for batch in store.iter_batches(512):
            idx = batch["index"]
            attr = torch.from_numpy(batch["attributions"]["x"])
            inside.append(mass_inside(attr, test_masks[idx]))
            delta = np.abs(batch["delta"])
            rel.append(delta / np.maximum(np.abs(batch["output"] - batch["baseline_output"]), 1e-6))
            max_abs = max(max_abs, float(delta.max()))
    sal = Saliency(model).attribute(test_x.to(device), target=test_y.to(device)).cpu()
    random_attr = torch.rand(test_x.shape, generator=torch.Generator().manual_seed(seed))
    return DemoReport(
        train_accuracy=train_acc,
        test_accuracy=test_acc,
        samples=samples,
        seconds=summary.seconds,
        median_rel_residual=float(np.median(np.concatenate(rel))),
        max_abs_residual=max_abs,
        mass_ig=float(torch.cat(inside).mean()),
        mass_saliency=float(mass_inside(sal, test_masks).mean()),
        mass_random=float(mass_inside(random_attr, test_masks).mean()),
        run_dir=out,
    )
