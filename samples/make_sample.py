"""Make the bundled sample: a small CNN trained on CIFAR-10 (dev subset) and a tiny data file.

    python samples/make_sample.py            # reads ../shared/data/cifar10-dev.npz

Writes samples/cnn_cifar10.pt2 (a torch.export program: loads without --trust-model-code, since it carries no
Python code) and samples/cifar10-sample.npz (a stratified 1,000/300 subset, ~3 MB, same keys as ../shared/data).
Deterministic for a given torch build: seeds are fixed and the training runs on one thread.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent


class SmallCNN(nn.Module):
    """Two conv blocks and a linear classifier: ~25k parameters, ~55 % on CIFAR-10 after a few epochs."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * 8 * 8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def stratified(y: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    idx = [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in np.unique(y)]
    return rng.permutation(np.concatenate(idx))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "cifar10-dev.npz")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--out-dir", type=Path, default=HERE, help="where to write the two files (default: samples/)")
    args = ap.parse_args()
    out_dir = args.out_dir
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    with np.load(args.data, allow_pickle=False) as z:
        xtr, ytr, xte, yte, classes = z["x_train"], z["y_train"], z["x_test"], z["y_test"], z["classes"]

    x = torch.from_numpy(xtr).permute(0, 3, 1, 2).float().div_(255)
    y = torch.from_numpy(ytr)
    model = SmallCNN(len(classes))
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            b = perm[i : i + 128]
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    xt = torch.from_numpy(xte).permute(0, 3, 1, 2).float().div_(255)
    with torch.no_grad():
        acc = (model(xt).argmax(1).numpy() == yte).mean()
    print(f"sample CNN: test accuracy {acc:.4f} on {len(yte)} images")

    # clone(): a slice would drag the whole test tensor into the archive as the sample input
    ep = torch.export.export(model, (xt[:2].clone(),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, out_dir / "cnn_cifar10.pt2")
    tr, te = stratified(ytr, 100, rng), stratified(yte, 30, rng)
    np.savez_compressed(out_dir / "cifar10-sample.npz", x_train=xtr[tr], y_train=ytr[tr], x_test=xte[te],
                        y_test=yte[te], classes=classes)
    print(f"wrote {out_dir / 'cnn_cifar10.pt2'} and {out_dir / 'cifar10-sample.npz'}")


if __name__ == "__main__":
    main()
