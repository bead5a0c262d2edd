"""The edge model: a plain ~0.3 M-parameter CNN.

Plain 3×3 convolutions with batch norm and ReLU, no depthwise layers: on this class of CPU they
run fastest in ONNX Runtime and quantize well to static INT8 with uint8 activations, whereas
depthwise nets got slower in INT8 (DESIGN §7). Global average *and* max pooling let a small
bright lesion count even when the rest of the lungs look normal.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class EdgeNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (16, 32, 32, 64, 64, 128, 128), classes: int = 2) -> None:
        super().__init__()
        strides = (2, 2, 1, 2, 1, 2, 1)
        layers: list[nn.Module] = []
        c_in = 1
        for width, stride in zip(widths, strides, strict=True):
            layers.append(_block(c_in, width, stride))
            c_in = width
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(2 * c_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        return self.head(self.dropout(pooled))
