"""A user's own networks, imported by tests as ``python:usermodels:NAME`` (tests/ is on sys.path).

``ControlFlowNet`` has what tracing-based feature extractors (torch.fx, torchvision's
``create_feature_extractor``) cannot follow: branches on tensor values and a
``return_features`` switch, as in many research code bases.
"""
from __future__ import annotations

import torch
from torch import nn


class ControlFlowNet(nn.Module):
    def __init__(self, in_chans: int = 3, width: int = 8, embed_dim: int = 16, num_classes: int = 4,
                 depth: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU()) for _ in range(depth))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Linear(width, embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            if x.abs().mean() > 1e6:  # a value-dependent branch: torch.fx cannot trace this
                break
            x = x + block(x)
        features = self.embed(self.pool(x).flatten(1))
        if return_features:
            return features
        return self.classifier(features)


def make_net(**kwargs) -> ControlFlowNet:
    """The factory a config names: ``source: python:usermodels:make_net``."""
    return ControlFlowNet(**kwargs)


class OutOfMemoryNet(nn.Module):
    """Raises CUDA's out-of-memory error for batches above ``max_batch`` (tests the retry)."""

    def __init__(self, max_batch: int = 3):
        super().__init__()
        self.max_batch = max_batch
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 2)
        self.batch_sizes: list = []

    def forward(self, x):
        self.batch_sizes.append(x.shape[0])
        if x.shape[0] > self.max_batch:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return self.fc(self.features(x).mean(dim=(2, 3)))


class NoClassifier(nn.Module):
    """No Linear layer at all: ``penultimate`` has nothing to refer to."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


class HiddenFc(nn.Module):
    """A hidden layer named ``fc`` and the real classifier named ``out`` (or ``head``)."""

    def __init__(self, head: str = "out", softmax: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 8)
        setattr(self, head, nn.Linear(8, 3))
        self.head_name, self.softmax = head, softmax

    def forward(self, x):
        logits = getattr(self, self.head_name)(torch.relu(self.fc(self.conv(x).mean((2, 3)))))
        return logits.softmax(-1) if self.softmax else logits


class Pickled:
    """An arbitrary object stored next to the weights: needs ``unsafe_pickle`` to load."""

    def __init__(self, note: str = "hello"):
        self.note = note


class DigitsCNN(nn.Module):
    """A small CNN for scikit-learn's 8x8 grey digits (the API tests train it for a second)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def digits_cnn(**kwargs) -> DigitsCNN:
    return DigitsCNN(**kwargs)
