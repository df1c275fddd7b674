"""Task heads on ViT features: multi-scale necks, UperNet, Semantic FPN, a depth head, a classifier.

- :class:`ViTMultiScaleNeck`: BEiT / MAE's way of feeding a plain ViT to UperNet: four block outputs (all at
  stride p) become strides 4, 8, 16, 32 px (for p = 16: two 2x transposed convs, one, identity, a 2x
  max-pool; :func:`pyramid_scales` gives the factors for any patch size).
- :class:`SimpleFeaturePyramid`: ViTDet's pyramid from the *last* map only (scales 4, 2, 1, 0.5, each ending
  in 1x1 + 3x3 convs with LayerNorm), plus a max-pooled extra level, in torchvision's naming ("0".."3",
  "pool"), so ``torchvision.models.detection.MaskRCNN`` takes it as its backbone.
- :class:`UperNetHead`: pyramid pooling on the coarsest level + FPN fusion of all levels (Xiao et al. 2018,
  as in mmsegmentation's ``UPerHead``).
- :class:`SemanticFPNHead`: FPN neck + Panoptic-FPN semantic branch (Kirillov et al. 2019, mmseg ``FPNHead``).
- :class:`SimpleDepthHead`: transposed-conv upsampling head for depth (the light head used in MIM depth
  studies) with a sigmoid times ``max_depth`` output; :func:`silog_loss` is its scale-invariant log loss.
- :class:`SyncBatchNorm` / :func:`convert_sync_batchnorm`: batch norm over the *global* batch of a data-parallel
  run on any backend (torch's ``nn.SyncBatchNorm`` refuses CPU tensors, so gloo runs could not use it).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of the global batch over the default process group.

    Two differentiable all-reduces (the sum, then the sum of squared deviations, with the element count), so
    N ranks with B / N samples each normalise, back-propagate and update running statistics exactly as one
    process with B samples would (up to fp32 summation order). Outside training, or without a process group
    of more than one rank, it is ``F.batch_norm``. Any input of shape ``N x C x ...``; the state dict is
    BatchNorm's, so checkpoints load either way."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        sync = self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not sync:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device)
        dist.all_reduce(count)
        n = float(count.item())
        mean = dist_fn.all_reduce(x.float().sum(dims)) / n
        centred = x.float() - mean.view(shape)
        var = dist_fn.all_reduce(centred.pow(2).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * n / max(n - 1.0, 1.0)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm (1d / 2d / 3d) in ``module`` by :class:`SyncBatchNorm` with the same parameters
    and buffers (in place for children; returns the converted root)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        out.load_state_dict(module.state_dict())
        out.train(module.training)
        if module.affine:
            out.weight.requires_grad_(module.weight.requires_grad)
            out.bias.requires_grad_(module.bias.requires_grad)
        return out.to(next(iter(module.state_dict().values())).device) if module.state_dict() else out
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a B x C x H x W map (ViTDet's norm)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    """mmcv's ConvModule: conv (no bias) + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)
    )


def _rescale(channels: int, scale: float, norm: str = "bn") -> nn.Module:
    """Resample a map by a power of two: k 2x transposed convs (norm + GELU between) or a 2^k max-pool."""
    k = round(math.log2(scale))
    if scale <= 0 or 2.0**k != scale:
        raise ValueError(f"scales: {scale} is not a power of two")
    if k == 0:
        return nn.Identity()
    if k < 0:
        return nn.MaxPool2d(2**-k, 2**-k)
    layers: list[nn.Module] = []
    for i in range(k):
        if i:
            layers += [nn.BatchNorm2d(channels) if norm == "bn" else LayerNorm2d(channels), nn.GELU()]
        layers.append(nn.ConvTranspose2d(channels, channels, 2, 2))
    return layers[0] if k == 1 else nn.Sequential(*layers)


def pyramid_scales(patch_size: int, strides: Sequence[int] = (4, 8, 16, 32)) -> tuple[float, ...]:
    """Scale factors that turn a stride-``patch_size`` map into the given strides (ViT-B/16: 4, 2, 1, 0.5)."""
    return tuple(patch_size / s for s in strides)


class ViTMultiScaleNeck(nn.Module):
    """Same-resolution ViT maps -> a pyramid (one scale factor per input map)."""

    def __init__(self, channels: int, scales: Sequence[float] = (4, 2, 1, 0.5)) -> None:
        super().__init__()
        self.scales = tuple(scales)
        self.ops = nn.ModuleList(_rescale(channels, s) for s in self.scales)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.ops):
            raise ValueError(f"expected {len(self.ops)} feature maps, got {len(features)}")
        return [op(f) for op, f in zip(self.ops, features)]


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid from the last ViT map (torchvision detection backbone protocol)."""

    def __init__(self, in_channels: int, out_channels: int, scales: Sequence[float] = (4, 2, 1, 0.5)) -> None:
        super().__init__()
        self.out_channels = out_channels
        stages = []
        for s in scales:
            stages.append(
                nn.Sequential(
                    _rescale(in_channels, s, norm="ln"),
                    nn.Conv2d(in_channels, out_channels, 1, bias=False),
                    LayerNorm2d(out_channels),
                    nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                    LayerNorm2d(out_channels),
                )
            )
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        out = OrderedDict((str(i), stage(x)) for i, stage in enumerate(self.stages))
        out["pool"] = F.max_pool2d(out[str(len(self.stages) - 1)], kernel_size=1, stride=2)
        return out


class UperNetHead(nn.Module):
    """UperNet decoder: PPM on the last level, FPN top-down fusion, concat, classify (at the finest stride)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        extra_last_channels: int = 0,
    ) -> None:
        super().__init__()
        in_channels = list(in_channels)
        in_channels[-1] += extra_last_channels
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_channels[-1], channels, 1))
            for s in pool_scales
        )
        self.bottleneck = conv_bn_relu(in_channels[-1] + len(pool_scales) * channels, channels)
        self.lateral = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels) for _ in in_channels[:-1])
        self.fuse = conv_bn_relu(len(in_channels) * channels, channels)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        last = features[-1]
        size = last.shape[-2:]
        ppm = [last] + [F.interpolate(p(last), size, mode="bilinear", align_corners=False) for p in self.ppm]
        laterals = [lat(f) for lat, f in zip(self.lateral, features[:-1])] + [
            self.bottleneck(torch.cat(ppm, 1))
        ]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], laterals[i - 1].shape[-2:], mode="bilinear", align_corners=False
            )
        outs = [fpn(x) for fpn, x in zip(self.fpn, laterals[:-1])] + [laterals[-1]]
        outs = [outs[0]] + [
            F.interpolate(o, outs[0].shape[-2:], mode="bilinear", align_corners=False) for o in outs[1:]
        ]
        return self.classifier(self.dropout(self.fuse(torch.cat(outs, 1))))


class SemanticFPNHead(nn.Module):
    """FPN neck (lateral 1x1 + top-down + 3x3) and the Panoptic-FPN semantic branch (upsample-and-sum)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        strides: Sequence[int] = (4, 8, 16, 32),
        dropout: float = 0.1,
        extra_last_channels: int = 0,
    ) -> None:
        super().__init__()
        in_channels = list(in_channels)
        in_channels[-1] += extra_last_channels
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.fpn = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)
        heads = []
        for s in strides:
            n = max(1, int(math.log2(s) - math.log2(strides[0])))
            layers: list[nn.Module] = []
            for _ in range(n):
                layers.append(conv_bn_relu(channels, channels))
                if s != strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            heads.append(nn.Sequential(*layers))
        self.scale_heads = nn.ModuleList(heads)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [lat(f) for lat, f in zip(self.lateral, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], laterals[i - 1].shape[-2:], mode="nearest"
            )
        pyramid = [fpn(x) for fpn, x in zip(self.fpn, laterals)]
        out = self.scale_heads[0](pyramid[0])
        for head, level in zip(self.scale_heads[1:], pyramid[1:]):
            out = out + F.interpolate(head(level), out.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.dropout(out))


class SimpleDepthHead(nn.Module):
    """``num_deconv`` x (4x4 stride-2 transposed conv + BN + ReLU), a 3x3 conv block, a 3x3 conv to one channel;
    output ``sigmoid * max_depth`` upsampled to the input size."""

    def __init__(
        self, in_channels: int, channels: int = 32, num_deconv: int = 3, max_depth: float = 10.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(num_deconv):
            layers += [
                nn.ConvTranspose2d(c, channels, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(True),
            ]
            c = channels
        self.up = nn.Sequential(*layers)
        self.conv = conv_bn_relu(c, channels)
        self.out = nn.Conv2d(channels, 1, 3, padding=1)
        self.max_depth = max_depth

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        y = self.out(self.conv(self.up(x)))
        y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(y) * self.max_depth


def silog_loss(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, variance_focus: float = 0.85
) -> torch.Tensor:
    """Scale-invariant log loss (Eigen et al.; BTS / AdaBins form, x10) over ``valid`` pixels."""
    d = torch.log(pred[valid].clamp(min=1e-6)) - torch.log(target[valid])
    if d.numel() == 0:
        return pred.sum() * 0.0
    return torch.sqrt((d**2).mean() - variance_focus * d.mean() ** 2 + 1e-8) * 10.0


class LinearHead(nn.Module):
    """Classifier on the pooled token; ``norm=True`` adds a non-affine BatchNorm first (MAE's linear probe)."""

    def __init__(
        self, in_features: int, num_classes: int, norm: bool = False, init_std: float = 0.01
    ) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_features, affine=False, eps=1e-6) if norm else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=init_std)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))
