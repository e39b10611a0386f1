"""Real-ESRGAN's two upscaler networks in their official key layout, built from the tensor shapes without spandrel.

Every upscaler the catalog ships is an ``RRDBNet`` (RealESRGAN_x4plus, x2plus, anime_6B) or an ``SRVGGNetCompact``
(realesr-animevideov3, realesr-general-x4v3) saved by BasicSR. spandrel builds them too, but importing spandrel
imports all its 45 architectures, and through LaMa torchvision, whose ``ops.roi_align`` imports ``torch._dynamo``:
1.5 s and 170 MB on every CLI run and app start (torch 2.14, torchvision 0.29) for two networks of 30 lines each.
So :func:`build_official` builds these two from the official key layout, and everything else (old ESRGAN keys,
8x RRDBNets, Compact networks without PReLU, every community architecture) still goes to spandrel
(:func:`engine.models.loader.build_network`).

The forward passes compute the reference ones (BasicSR's ``RRDBNet``, Real-ESRGAN's ``SRVGGNetCompact``) operation
for operation, so the outputs are bit-identical to the official implementation (``tests/test_loader.py``); two
differences: RRDBNet's upsampling stage runs on bands of rows with enough context (:func:`tail_rows`), which
gives the same output and holds a third of the memory, and its dense blocks write each output into the next
convolution's input instead of concatenating (when autograd does not record). The
network is made on the meta device and takes the weights' tensors as its parameters (``assign=True``): no random
initialisation, no copy of a memory-mapped file.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ARCHITECTURES", "RRDBNet", "SRVGGNetCompact", "TAIL_BAND_BYTES", "build_official", "new_network",
           "tail_rows"]

StateDict = Mapping[str, torch.Tensor]

_UNSHUFFLE = {4: 1, 2: 2, 1: 4}  # RRDBNet scale -> pixel-unshuffle factor of its input


class _DenseBlock(nn.Module):
    """Five 3x3 convolutions, each seeing the block input and every earlier output; residual scaled by 0.2."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.conv1.weight.requires_grad):
            return self._reference(x)
        # Inference: each convolution's activated output is written once, straight into the next convolution's
        # input (after a copy of the earlier channels) instead of four torch.cat of fresh tensors. The same values;
        # cat, leaky_relu and the residual went from 1.9 to 1.1 s of a 256² x4plus pass in fp32 NHWC on 2 cores
        # (torch.profiler), the pass 1-5% faster in interleaved pairs. One NCHW image keeps every input as a
        # prefix of one buffer.
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        whole = None
        if layout == torch.contiguous_format and x.shape[0] == 1:
            whole = _new_like(x, self.conv5.in_channels, layout)
            whole[:, :x.shape[1]].copy_(x)
        features = x
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            width = features.shape[1]
            if whole is not None:
                merged = whole[:, :width + conv.out_channels]
            else:
                merged = _new_like(x, width + conv.out_channels, layout)
                merged[:, :width].copy_(features)
            torch.ops.aten.leaky_relu.out(conv(features), 0.2, out=merged[:, width:])
            features = merged
        return self.conv5(features).mul_(0.2).add_(x)

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        """BasicSR's forward, op for op (what autograd records)."""
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


def _new_like(x: torch.Tensor, channels: int, layout: torch.memory_format) -> torch.Tensor:
    """An uninitialised ``x`` with ``channels`` channels in ``layout``."""
    return torch.empty((x.shape[0], channels, *x.shape[2:]), dtype=x.dtype, device=x.device, memory_format=layout)


class _RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks, residual scaled by 0.2."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.rdb1 = _DenseBlock(num_feat, num_grow_ch)
        self.rdb2 = _DenseBlock(num_feat, num_grow_ch)
        self.rdb3 = _DenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rdb3(self.rdb2(self.rdb1(x)))
        if torch.is_grad_enabled() and out.requires_grad:
            return out * 0.2 + x
        return out.mul_(0.2).add_(x)  # the same values without a second fresh tensor


class RRDBNet(nn.Module):
    """ESRGAN's generator as Real-ESRGAN trains it (BasicSR key layout).

    x4 works on the input directly; x2 and x1 pixel-unshuffle it first (by 2 and 4), so every scale ends with the
    same two nearest-neighbour x2 upsamplings.

    Args:
        num_in_ch: image channels in; num_out_ch: image channels out.
        scale: 1, 2 or 4.
        num_feat: feature channels; num_block: RRDB blocks; num_grow_ch: channels each dense layer adds.
    """

    def __init__(self, num_in_ch: int, num_out_ch: int, scale: int = 4, num_feat: int = 64, num_block: int = 23,
                 num_grow_ch: int = 32):
        super().__init__()
        if scale not in _UNSHUFFLE:
            raise ValueError(f"RRDBNet scale must be 1, 2 or 4, got {scale}.")
        self.scale = scale
        self.conv_first = nn.Conv2d(num_in_ch * _UNSHUFFLE[scale] ** 2, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(_RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``NxCxHxW`` float in [0, 1] (H, W multiples of 4 / scale) -> ``NxC'x(H*scale)x(W*scale)``."""
        if _UNSHUFFLE[self.scale] > 1:
            x = F.pixel_unshuffle(x, _UNSHUFFLE[self.scale])
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        height = feat.shape[2]
        rows = tail_rows(feat)
        if rows >= height:
            return self._upsample(feat)
        nhwc = feat.is_contiguous(memory_format=torch.channels_last)
        layout = torch.channels_last if nhwc else torch.contiguous_format
        out = torch.empty((feat.shape[0], self.conv_last.out_channels, height * 4, feat.shape[3] * 4),
                          dtype=feat.dtype, device=feat.device, memory_format=layout)
        for top in range(0, height, rows):
            bottom = min(top + rows, height)
            start, end = max(top - TAIL_HALO, 0), min(bottom + TAIL_HALO, height)
            out[:, :, top * 4:bottom * 4] = self._upsample(feat[:, :, start:end])[
                :, :, (top - start) * 4:(bottom - start) * 4]
        return out

    def _upsample(self, feat: torch.Tensor) -> torch.Tensor:
        """The upsampling stage: two nearest x2 steps with a convolution each, then two convolutions at x4."""
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


TAIL_BAND_BYTES = 48 * 2 ** 20
"""The most one x4 feature map of :class:`RRDBNet`'s upsampling stage may take: the stage runs on bands of the
body's output rows that keep each map it makes (64 channels at 16x the pixels, the bulk of the ~10.7 KB per input
pixel that a whole pass holds) within this, so a pass needs what its body does (~3.1 KB per input pixel) or the
bands' ~120 MB, whichever is more. The same output (bit for bit on the CPU, ``tests/test_loader.py``): every band
is computed with :data:`TAIL_HALO` rows of context."""

TAIL_HALO = 2
"""Input rows of context above and below each band of the upsampling stage: its convolutions reach one pixel at x2
and three at x4 (1.25 input rows); past that a band's output equals the whole pass's."""

TAIL_MIN_ROWS = 16
"""The fewest rows a band has (the halo's recomputation then costs at most 25% of the stage, ~2% of the pass)."""


def tail_rows(feat: torch.Tensor) -> int:
    """Rows of the body's output ``feat`` (NxCxHxW) per band of the upsampling stage (H or more: one band). Pure."""
    batch, channels, _height, width = feat.shape
    row_bytes = batch * channels * width * 16 * feat.element_size()
    return max(TAIL_MIN_ROWS, TAIL_BAND_BYTES // max(row_bytes, 1))


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact network: a plain stack of 3x3 convolutions with PReLU at the input's size, a pixel
    shuffle, and the nearest-neighbour upscaled input added back.

    Args:
        num_in_ch: image channels in; num_out_ch: image channels out.
        num_feat: feature channels; num_conv: body convolutions; upscale: the scale.
        act_type: ``"prelu"``, the only activation of the official models (the catalog states it).
    """

    def __init__(self, num_in_ch: int, num_out_ch: int, num_feat: int = 64, num_conv: int = 16, upscale: int = 4,
                 act_type: str = "prelu"):
        super().__init__()
        if act_type != "prelu":
            raise ValueError(f"Only the PReLU SRVGGNetCompact is built here, not act_type={act_type!r}.")
        self.upscale = upscale
        layers: list[nn.Module] = [nn.Conv2d(num_in_ch, num_feat, 3, 1, 1), nn.PReLU(num_parameters=num_feat)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), nn.PReLU(num_parameters=num_feat)]
        layers.append(nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, 1, 1))
        self.body = nn.ModuleList(layers)
        self.upsampler = nn.PixelShuffle(upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``NxCxHxW`` float in [0, 1] -> ``NxC'x(H*upscale)x(W*upscale)``."""
        out = x
        for layer in self.body:
            out = layer(out)
        out = self.upsampler(out)
        out += F.interpolate(x, scale_factor=self.upscale, mode="nearest")
        return out


def new_network(arch: str, arch_params: Mapping[str, object]) -> nn.Module:
    """``arch`` (one of :data:`ARCHITECTURES`) made from the catalog's hyper-parameters, with PyTorch's default
    initialisation; made under a ``torch.device("meta")`` context it has shapes only.

    Raises:
        ValueError: an architecture or a hyper-parameter this module does not build.
    """
    cls = {"RRDBNet": RRDBNet, "SRVGGNetCompact": SRVGGNetCompact}.get(arch)
    if cls is None:
        raise ValueError(f"{arch!r} is not built here; known: {', '.join(sorted(ARCHITECTURES))}.")
    return cls(**arch_params)


def build_official(arch: str, state_dict: StateDict) -> tuple[nn.Module, dict] | None:
    """Build ``arch`` (``"RRDBNet"`` or ``"SRVGGNetCompact"``) from weights in the official key layout.

    The hyper-parameters are read from the tensor shapes. The network takes the tensors themselves (a
    memory-mapped file stays mapped until the caller converts the module).

    Args:
        arch: the catalog architecture.
        state_dict: unwrapped weights.

    Returns:
        ``(network, hyper-parameters)``: the network (float32, eval mode, no gradients) and the keyword arguments
        it was made with (``num_in_ch``, ``num_out_ch``, ``scale`` or ``upscale``...); None when ``arch`` is
        neither of the two or the weights are not exactly its official layout (then spandrel, which knows every
        variant, decides what they are).
    """
    read = _READERS.get(arch)
    params = read(state_dict) if read is not None else None
    if params is None:
        return None
    with torch.device("meta"):
        module = new_network(arch, params)
    expected = module.state_dict()
    if set(expected) != set(state_dict) or any(expected[k].shape != state_dict[k].shape for k in expected):
        return None
    module.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True, assign=True)
    module.eval().requires_grad_(False)
    return module, params


def _read_rrdbnet(state: StateDict) -> dict | None:
    """RRDBNet's hyper-parameters from the tensor shapes; None when they are not an official layout."""
    first, last, grow = (state.get(k) for k in ("conv_first.weight", "conv_last.weight", "body.0.rdb1.conv1.weight"))
    if first is None or last is None or grow is None or first.ndim != 4:
        return None
    channels_out = last.shape[0]
    unshuffled = first.shape[1]
    scale = next((s for s, f in _UNSHUFFLE.items() if unshuffled == channels_out * f * f), None)
    if scale is None:  # channels in != channels out: not an official Real-ESRGAN layout
        return None
    blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"body\.(\d+)\.", k)))
    return dict(num_in_ch=channels_out, num_out_ch=channels_out, scale=scale, num_feat=first.shape[0],
                num_block=blocks, num_grow_ch=grow.shape[0])


def _read_srvgg(state: StateDict) -> dict | None:
    """SRVGGNetCompact's hyper-parameters from the tensor shapes; None when they are not an official layout."""
    convs = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"body\.(\d+)\.bias", k)))
    first = state.get("body.0.weight")
    if len(convs) < 2 or "body.1.weight" not in state or first is None or first.ndim != 4:
        return None  # no PReLU at body.1: a ReLU/LeakyReLU variant, which the weights cannot tell apart
    channels_in, num_feat = first.shape[1], first.shape[0]
    last_weight = state.get(f"body.{convs[-1]}.weight")
    if last_weight is None or last_weight.ndim != 4:
        return None
    last = last_weight.shape[0]
    upscale = math.isqrt(last // channels_in) if last % channels_in == 0 else 0
    if upscale < 1 or upscale * upscale * channels_in != last:
        return None
    return dict(num_in_ch=channels_in, num_out_ch=channels_in, num_feat=num_feat, num_conv=len(convs) - 2,
                upscale=upscale)


_READERS = {"RRDBNet": _read_rrdbnet, "SRVGGNetCompact": _read_srvgg}

ARCHITECTURES = frozenset(_READERS)
"""The catalog architectures :func:`build_official` builds (in their official key layout)."""
