"""Example networks: the seed's Wide-ResNet, for 32x32 images.

Examples:
    >>> import torch
    >>> from samfunc.models import WideResNet
    >>> model = WideResNet(depth=16, width_factor=2, num_classes=10)
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["WideResNet"]


class _Block(nn.Module):
    """Pre-activation residual block: BN-ReLU-conv, BN-ReLU-dropout-conv."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = torch.relu(self.norm1(x))
        hidden: torch.Tensor = self.conv1(activated)
        out: torch.Tensor = self.conv2(self.dropout(torch.relu(self.norm2(hidden))))
        skip: torch.Tensor = x if self.shortcut is None else self.shortcut(activated)
        return out + skip


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko and Komodakis, 2016), the network of the seed's example.

    Args:
        depth: total depth, ``6 n + 4`` (16, 22, 28, ...).
        width_factor: the widening factor ``k`` (2 on a CPU, 8 for the paper's WRN-16-8).
        num_classes: output classes.
        dropout: dropout rate inside each block.
        in_channels: input channels (3 for RGB).
    """

    def __init__(
        self,
        depth: int = 16,
        width_factor: int = 8,
        num_classes: int = 10,
        dropout: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6 n + 4 with n >= 1, got {depth}")
        if width_factor < 1:
            raise ValueError(f"width_factor must be >= 1, got {width_factor}")
        blocks_per_group = (depth - 4) // 6
        widths = [16, 16 * width_factor, 32 * width_factor, 64 * width_factor]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)]
        for group, stride in enumerate((1, 2, 2)):
            for index in range(blocks_per_group):
                in_width = widths[group] if index == 0 else widths[group + 1]
                layers.append(
                    _Block(in_width, widths[group + 1], stride if index == 0 else 1, dropout)
                )
        layers += [
            nn.BatchNorm2d(widths[3]),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(widths[3], num_classes),
        ]
        self.layers = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images ``(N, C, H, W)``."""
        logits: torch.Tensor = self.layers(x)
        return logits
