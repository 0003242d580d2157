"""Small vision classifiers for the federated baselines (28×28 grayscale inputs, e.g. Fashion-MNIST).

Every model is ``head(body(x))``: ``body`` maps an image batch to a flat hidden code (the last
hidden layer) and ``head`` is the final linear classifier. HP-FL pretrains ``body`` as the encoder
of a denoising autoencoder, so the split is part of the contract.

No BatchNorm anywhere (the ResNet uses GroupNorm): the whole model state is parameters, so the
trainable state the clients exchange is the full state and there are no running statistics to
average.
"""

from __future__ import annotations

from torch import Tensor, nn


class LeNet300100(nn.Module):
    """The 784-300-100-10 ReLU MLP of LeCun et al. (1998), as used by the lottery-ticket paper."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(),
                                  nn.Linear(300, 100), nn.ReLU())
        self.head = nn.Linear(100, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class SmallCNN(nn.Module):
    """conv5×5(16) → pool → conv5×5(32) → pool → fc 64 → fc classes (≈114k parameters)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(),
        )
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class ResidualBlock(nn.Module):
    """Two 3×3 convs with GroupNorm; a 1×1 projection on the skip path when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, groups: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.skip = (nn.Identity() if stride == 1 and c_in == c_out
                     else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False))
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.skip(x))


class SmallResNet(nn.Module):
    """A ResNet-style net (He et al., 2016) for 28×28: stem 16 → blocks 16, 32/2, 64/2 → pool → fc."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.GroupNorm(4, 16), nn.ReLU(),
            ResidualBlock(16, 16), ResidualBlock(16, 32, stride=2), ResidualBlock(32, 64, stride=2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


VISION_MODELS: dict[str, type[nn.Module]] = {
    "lenet300100": LeNet300100,
    "cnn": SmallCNN,
    "resnet": SmallResNet,
}


def build_vision_model(name: str, num_classes: int = 10) -> nn.Module:
    """A freshly initialized model by name (seed the global RNG first for a reproducible init)."""
    if name not in VISION_MODELS:
        raise ValueError(f"unknown vision model {name!r}; expected one of {sorted(VISION_MODELS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return VISION_MODELS[name](num_classes)
