"""PIDNet S/M/L (Xu et al., CVPR 2023), laid out key for key like the official release.

The network is rebuilt from the paper and the released state-dict layout so that official
checkpoints load without renaming. Every operation between the convolutions (residual adds,
the P/I/D fusions and their sigmoid gates, products, resizes, concatenations) is a
parameter-free module, so a quantizer can attach to its inputs or output without changing the
state dict: an INT8 runtime runs such an op in integer form only when its inputs and output
are quantized.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BN_MOMENTUM = 0.1


@dataclass(frozen=True)
class PIDNetSpec:
    """Width and depth of one PIDNet variant."""

    m: int
    n: int
    planes: int
    ppm_planes: int
    head_planes: int


VARIANTS: dict[str, PIDNetSpec] = {
    "pidnet_s": PIDNetSpec(m=2, n=3, planes=32, ppm_planes=96, head_planes=128),
    "pidnet_m": PIDNetSpec(m=2, n=3, planes=64, ppm_planes=96, head_planes=128),
    "pidnet_l": PIDNetSpec(m=3, n=4, planes=64, ppm_planes=112, head_planes=256),
}


# --------------------------------------------------------------------------- merge operations
class Add(nn.Module):
    """``x + skip`` as a module. TensorRT fuses a conv into an add, so ``skip`` is the input
    that gets a quantizer; ``x`` is usually the conv (or upsampled) branch."""

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return x + skip


class Blend(nn.Module):
    """``(1 - gate) * x + gate * y``: the gated fusion of the P/I branches."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return (1 - gate) * x + gate * y


class Concat(nn.Module):
    """Concatenation as a module (along channels unless ``dim`` says otherwise)."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(tensors, dim=self.dim)


class Mul(nn.Module):
    """``x * y`` (broadcasting) as a module."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x * y


class Complement(nn.Module):
    """``1 - x`` as a module: the weight of the other branch in a gated fusion."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1 - x


class PixelAttention(nn.Module):
    """``sigmoid(sum_c x * y)``: per pixel, how much ``x`` agrees with ``y`` (PagFM's gate)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(torch.sum(x * y, dim=1, keepdim=True))


class Resize(nn.Module):
    """``F.interpolate`` as a module: bilinear to ``size`` with ``align_corners=False``
    (upstream PIDNet's) unless told otherwise."""

    def __init__(self, mode: str = "bilinear", align_corners: bool | None = False) -> None:
        super().__init__()
        self.mode, self.align_corners = mode, align_corners

    def forward(self, x: torch.Tensor, size: Any = None, scale_factor: Any = None
                ) -> torch.Tensor:
        return F.interpolate(x, size=size, scale_factor=scale_factor, mode=self.mode,
                             align_corners=self.align_corners)


def _conv_bn(cin: int, cout: int, kernel: int = 1, padding: int = 0) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=kernel, padding=padding, bias=False),
        nn.BatchNorm2d(cout, momentum=BN_MOMENTUM),
    )


def _bn_relu_conv(cin: int, cout: int, kernel: int = 1, padding: int = 0, groups: int = 1,
                  pool: nn.Module | None = None) -> nn.Sequential:
    layers = [] if pool is None else [pool]
    layers += [
        nn.BatchNorm2d(cin, momentum=BN_MOMENTUM),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, kernel_size=kernel, padding=padding, groups=groups, bias=False),
    ]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- blocks
class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet basic block)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, no_relu: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.downsample = downsample
        self.add = Add()
        self.no_relu = no_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        out = self.add(out, skip)
        return out if self.no_relu else self.relu(out)


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 convs with a residual connection, expansion 2."""

    expansion = 2

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, no_relu: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.add = Add()
        self.no_relu = no_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        skip = x if self.downsample is None else self.downsample(x)
        out = self.add(out, skip)
        return out if self.no_relu else self.relu(out)


class SegmentHead(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv1x1 classifier (official name: ``segmenthead``)."""

    def __init__(self, inplanes: int, interplanes: int, outplanes: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, momentum=BN_MOMENTUM)
        self.conv1 = nn.Conv2d(inplanes, interplanes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(interplanes, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(interplanes, outplanes, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.relu(self.bn1(x)))
        return self.conv2(self.relu(self.bn2(x)))


class _PyramidPooling(nn.Module):
    """Shared parts of DAPPM and PAPPM: four pooled scales, a full-resolution scale, a shortcut."""

    def __init__(self, inplanes: int, branch_planes: int, outplanes: int) -> None:
        super().__init__()
        self.scale1 = _bn_relu_conv(inplanes, branch_planes, pool=nn.AvgPool2d(5, 2, 2))
        self.scale2 = _bn_relu_conv(inplanes, branch_planes, pool=nn.AvgPool2d(9, 4, 4))
        self.scale3 = _bn_relu_conv(inplanes, branch_planes, pool=nn.AvgPool2d(17, 8, 8))
        self.scale4 = _bn_relu_conv(inplanes, branch_planes, pool=nn.AdaptiveAvgPool2d((1, 1)))
        self.scale0 = _bn_relu_conv(inplanes, branch_planes)
        self.resizes = nn.ModuleList(Resize() for _ in range(4))

    def _pooled(self, x: torch.Tensor) -> list[torch.Tensor]:
        size = (x.shape[-2], x.shape[-1])
        scales = (self.scale1, self.scale2, self.scale3, self.scale4)
        return [resize(s(x), size) for s, resize in zip(scales, self.resizes)]


class PAPPM(_PyramidPooling):
    """Parallel aggregation pyramid pooling (PIDNet-S/M)."""

    def __init__(self, inplanes: int, branch_planes: int, outplanes: int) -> None:
        super().__init__(inplanes, branch_planes, outplanes)
        self.scale_process = _bn_relu_conv(branch_planes * 4, branch_planes * 4, kernel=3,
                                           padding=1, groups=4)
        self.compression = _bn_relu_conv(branch_planes * 5, outplanes)
        self.shortcut = _bn_relu_conv(inplanes, outplanes)
        self.adds = nn.ModuleList(Add() for _ in range(4))
        self.cat_scales = Concat()
        self.cat_all = Concat()
        self.add_out = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.scale0(x)
        scales = [add(p, x0) for add, p in zip(self.adds, self._pooled(x))]
        scale_out = self.scale_process(self.cat_scales(scales))
        return self.add_out(self.compression(self.cat_all([x0, scale_out])), self.shortcut(x))


class DAPPM(_PyramidPooling):
    """Deep aggregation pyramid pooling (PIDNet-L), scales refined one after another."""

    def __init__(self, inplanes: int, branch_planes: int, outplanes: int) -> None:
        super().__init__(inplanes, branch_planes, outplanes)
        for k in range(1, 5):
            setattr(self, f"process{k}", _bn_relu_conv(branch_planes, branch_planes, kernel=3,
                                                       padding=1))
        self.compression = _bn_relu_conv(branch_planes * 5, outplanes)
        self.shortcut = _bn_relu_conv(inplanes, outplanes)
        self.adds = nn.ModuleList(Add() for _ in range(4))
        self.cat_all = Concat()
        self.add_out = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.scale0(x)]
        processes = (self.process1, self.process2, self.process3, self.process4)
        for process, add, pooled in zip(processes, self.adds, self._pooled(x)):
            outs.append(process(add(pooled, outs[-1])))
        return self.add_out(self.compression(self.cat_all(outs)), self.shortcut(x))


class PagFM(nn.Module):
    """Pixel-attention-guided fusion: the I branch ``y`` guides the P branch ``x``."""

    def __init__(self, in_channels: int, mid_channels: int) -> None:
        super().__init__()
        self.f_x = _conv_bn(in_channels, mid_channels)
        self.f_y = _conv_bn(in_channels, mid_channels)
        self.resize_q = Resize()
        self.resize_y = Resize()
        self.attention = PixelAttention()
        self.blend = Blend()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        size = (x.shape[-2], x.shape[-1])
        y_q = self.resize_q(self.f_y(y), size)
        x_k = self.f_x(x)
        gate = self.attention(x_k, y_q)
        return self.blend(x, self.resize_y(y, size), gate)


class LightBag(nn.Module):
    """Light boundary-attention-guided fusion of P, I and D (PIDNet-S/M; official ``Light_Bag``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv_p = _conv_bn(in_channels, out_channels)
        self.conv_i = _conv_bn(in_channels, out_channels)
        self.edge = nn.Sigmoid()
        self.complement = Complement()
        self.mul_i = Mul()
        self.mul_p = Mul()
        self.add_p = Add()
        self.add_i = Add()
        self.add_out = Add()

    def forward(self, p: torch.Tensor, i: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        edge = self.edge(d)
        p_add = self.conv_p(self.add_p(self.mul_i(self.complement(edge), i), p))
        i_add = self.conv_i(self.add_i(self.mul_p(edge, p), i))
        return self.add_out(p_add, i_add)


class Bag(nn.Module):
    """Boundary-attention-guided fusion of P, I and D (PIDNet-L)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = _bn_relu_conv(in_channels, out_channels, kernel=3, padding=1)
        self.edge = nn.Sigmoid()
        self.blend = Blend()

    def forward(self, p: torch.Tensor, i: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return self.conv(self.blend(i, p, self.edge(d)))


# --------------------------------------------------------------------------- network
def _make_layer(block: type[BasicBlock] | type[Bottleneck], inplanes: int, planes: int,
                blocks: int, stride: int = 1) -> nn.Sequential:
    """A stage of ``blocks`` blocks; the last one ends without ReLU, as upstream."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = _strided_projection(inplanes, planes * block.expansion, stride)
    layers = [block(inplanes, planes, stride, downsample)]
    for i in range(1, blocks):
        layers.append(block(planes * block.expansion, planes, no_relu=(i == blocks - 1)))
    return nn.Sequential(*layers)


def _make_single(block: type[BasicBlock] | type[Bottleneck], inplanes: int,
                 planes: int) -> BasicBlock | Bottleneck:
    downsample = None
    if inplanes != planes * block.expansion:
        downsample = _strided_projection(inplanes, planes * block.expansion, 1)
    return block(inplanes, planes, 1, downsample, no_relu=True)


def _strided_projection(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(cout, momentum=BN_MOMENTUM))


class PIDNet(nn.Module):
    """Three-branch real-time segmentation network: P (detail), I (context), D (boundary).

    Returns logits at 1/8 of the input resolution: ``[p_head, main, boundary_head]`` when built
    with ``augment=True`` (training), the main logits alone otherwise.
    """

    def __init__(self, spec: PIDNetSpec, num_classes: int = 19, augment: bool = True) -> None:
        super().__init__()
        m, n, planes = spec.m, spec.n, spec.planes
        self.augment = augment
        # I branch
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, planes, 3, stride=2, padding=1),
            nn.BatchNorm2d(planes, momentum=BN_MOMENTUM),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride=2, padding=1),
            nn.BatchNorm2d(planes, momentum=BN_MOMENTUM),
            nn.ReLU(inplace=True),
        )
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _make_layer(BasicBlock, planes, planes, m)
        self.layer2 = _make_layer(BasicBlock, planes, planes * 2, m, stride=2)
        self.layer3 = _make_layer(BasicBlock, planes * 2, planes * 4, n, stride=2)
        self.layer4 = _make_layer(BasicBlock, planes * 4, planes * 8, n, stride=2)
        self.layer5 = _make_layer(Bottleneck, planes * 8, planes * 8, 2, stride=2)
        # P branch
        self.compression3 = _conv_bn(planes * 4, planes * 2)
        self.compression4 = _conv_bn(planes * 8, planes * 2)
        self.pag3 = PagFM(planes * 2, planes)
        self.pag4 = PagFM(planes * 2, planes)
        self.layer3_ = _make_layer(BasicBlock, planes * 2, planes * 2, m)
        self.layer4_ = _make_layer(BasicBlock, planes * 2, planes * 2, m)
        self.layer5_ = _make_layer(Bottleneck, planes * 2, planes * 2, 1)
        # D branch
        if m == 2:
            self.layer3_d = _make_single(BasicBlock, planes * 2, planes)
            self.layer4_d = _make_layer(Bottleneck, planes, planes, 1)
            self.diff3 = _conv_bn(planes * 4, planes, kernel=3, padding=1)
            self.diff4 = _conv_bn(planes * 8, planes * 2, kernel=3, padding=1)
            self.spp: nn.Module = PAPPM(planes * 16, spec.ppm_planes, planes * 4)
            self.dfm: nn.Module = LightBag(planes * 4, planes * 4)
        else:
            self.layer3_d = _make_single(BasicBlock, planes * 2, planes * 2)
            self.layer4_d = _make_single(BasicBlock, planes * 2, planes * 2)
            self.diff3 = _conv_bn(planes * 4, planes * 2, kernel=3, padding=1)
            self.diff4 = _conv_bn(planes * 8, planes * 2, kernel=3, padding=1)
            self.spp = DAPPM(planes * 16, spec.ppm_planes, planes * 4)
            self.dfm = Bag(planes * 4, planes * 4)
        self.layer5_d = _make_layer(Bottleneck, planes * 2, planes * 2, 1)
        self.add_d3 = Add()
        self.add_d4 = Add()
        self.resize_d3 = Resize()
        self.resize_d4 = Resize()
        self.resize_i = Resize()
        # heads
        if augment:
            self.seghead_p = SegmentHead(planes * 2, spec.head_planes, num_classes)
            self.seghead_d = SegmentHead(planes * 2, planes, 1)
        self.final_layer = SegmentHead(planes * 4, spec.head_planes, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        x = self.layer1(self.conv1(x))
        x = self.relu(self.layer2(self.relu(x)))
        x_p = self.layer3_(x)
        x_d = self.layer3_d(x)
        size = (x_d.shape[-2], x_d.shape[-1])

        x = self.relu(self.layer3(x))
        x_p = self.pag3(x_p, self.compression3(x))
        x_d = self.add_d3(self.resize_d3(self.diff3(x), size), x_d)
        # Upstream keeps these for the auxiliary heads and then applies an in-place ReLU to
        # them, so the heads see the rectified tensors; done explicitly here.
        x_p = self.relu(x_p)
        temp_p = x_p

        x = self.relu(self.layer4(x))
        x_p = self.layer4_(x_p)
        x_d = self.layer4_d(self.relu(x_d))
        x_p = self.pag4(x_p, self.compression4(x))
        x_d = self.add_d4(self.resize_d4(self.diff4(x), size), x_d)
        x_d = self.relu(x_d)
        temp_d = x_d

        x_p = self.layer5_(self.relu(x_p))
        x_d = self.layer5_d(x_d)
        x = self.resize_i(self.spp(self.layer5(x)), size)
        out = self.final_layer(self.dfm(x_p, x, x_d))
        if self.augment:
            return [self.seghead_p(temp_p), out, self.seghead_d(temp_d)]
        return out


def create_model(name: str, num_classes: int = 19, augment: bool = True) -> PIDNet:
    """Build a PIDNet variant by its exact name: ``pidnet_s``, ``pidnet_m`` or ``pidnet_l``."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(VARIANTS)}")
    return PIDNet(VARIANTS[name], num_classes=num_classes, augment=augment)
