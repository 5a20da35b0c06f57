"""Small models for the embedded demo (``source: demo:NAME``).

They are sized for scikit-learn's 8x8 digits so the demo trains in seconds on a laptop CPU.
"""
from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """A classic MNIST-style classifier: conv blocks -> fc -> classifier.

    Layers worth looking at: ``features`` (pooled conv features), ``fc`` (the penultimate
    layer: the classifier's input) and ``classifier`` (logits).
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 32, hidden: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(8 * width, hidden), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fc(self.features(x)))


class MLP(nn.Module):
    """A two-hidden-layer perceptron on flattened pixels (``hidden1``, ``hidden2``, ``classifier``)."""

    def __init__(self, in_features: int = 64, num_classes: int = 10, hidden: int = 128):
        super().__init__()
        self.flatten = nn.Flatten()
        self.hidden1 = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True))
        self.hidden2 = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hidden2(self.hidden1(self.flatten(x))))


DEMO_MODELS = {"cnn": SmallCNN, "mlp": MLP}
