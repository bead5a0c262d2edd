"""The edge model: a plain ~0.3 M-parameter CNN with a lesion-map head.

Plain 3×3 convolutions with batch norm and ReLU, no depthwise layers: on this class of CPU they
run fastest in ONNX Runtime and quantize well to static INT8 with uint8 activations, whereas
depthwise nets got slower in INT8 (DESIGN §7).

The head scores every cell of an 8×8 grid for "lesion here", and the image score is a soft OR
(log-sum-exp) of the cells. Training supervises the cells with the phantoms' lesion masks as well
as the image label: with the image label alone the gradient of a pooled score lands on the
brightest structures (collimator edges, spine), and a small lesion is learned very slowly.
The exported graph outputs two logits per image, one per label, as the manifest says.
``CentralNet``, the model of the central server, is the same design made wider for a larger
input and kept in FP32.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(c_in: int, c_out: int, stride: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class EdgeNet(nn.Module):
    def __init__(
        self,
        widths: tuple[int, ...] = (16, 32, 32, 64, 64, 128, 128),
        dilations: tuple[int, ...] = (1, 1, 1, 1, 1, 1, 1),
    ) -> None:
        super().__init__()
        strides = (2, 2, 1, 2, 1, 2, 1)
        layers: list[nn.Module] = []
        c_in = 1
        for width, stride, dilation in zip(widths, strides, dilations, strict=True):
            layers.append(_block(c_in, width, stride, dilation))
            c_in = width
        self.features = nn.Sequential(*layers)
        self.cells = nn.Conv2d(c_in, 1, 1)
        self.offset = nn.Parameter(torch.zeros(1))

    def lesion_map(self, x: torch.Tensor) -> torch.Tensor:
        """Per-cell lesion logits, N×1×8×8 for a 128×128 input."""
        result: torch.Tensor = self.cells(self.features(x))
        return result

    def image_score(self, cells: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(cells.flatten(1), dim=1) + self.offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.image_score(self.lesion_map(x))
        return torch.stack([-score / 2, score / 2], dim=1)


CENTRAL_WIDTHS = (24, 48, 48, 96, 96, 192, 192)
CENTRAL_DILATIONS = (1, 1, 1, 1, 2, 1, 2)


class CentralNet(EdgeNet):
    """The central model: the edge recipe at 1.5× the width, run on a 192×192 input in FP32.

    It sees the cases edge devices escalate, faint findings among them, so it gets more
    pixels per millimetre (a 16 mm nodule is 7.7 pixels across instead of 5.1) and more
    channels; the lesion map becomes 12×12 cells of 16 pixels each. The stride-1 convolutions
    of the last two stages are dilated by 2, which keeps the receptive field at about 70 % of
    the image width (135 of 192 pixels; the edge model's is 87 of 128) at no extra cost: a
    large faint opacity is judged against its surroundings. The cell supervision, the soft-OR
    image score and the two-logit output are the edge model's, so one training loop and one
    manifest format serve both. Nothing here is quantized: the server has the compute.
    """

    def __init__(self) -> None:
        super().__init__(widths=CENTRAL_WIDTHS, dilations=CENTRAL_DILATIONS)
