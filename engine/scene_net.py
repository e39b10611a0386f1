"""What a network trained on many photos and drawings sees in an image: the content advisor's second signal.

The 15 hand-made measures of :mod:`engine.image_analysis` separate the sources they were fitted on well, but on
images from elsewhere they miss most painted and shaded drawings (soft gradients read as a photo's). A network
trained on tens of thousands of images knows more of both kinds. The one used here is the MobileNetV2 that the
npm package nsfwjs 4.4.0 ships (MIT, Infinite Red; ``engine/data/LICENSE-nsfwjs``): trained to tell drawings from
photographs among other classes, its weights in the package itself, so they can be had offline from a registry.
Only its convolutional part is used: the 1280 averaged features of its last layer. A linear head on them, fitted by
``bench/fit_content_type.py`` on the labelled set (``engine/data/scene_head.npz``), gives log-odds of "anime" that
:func:`engine.image_analysis.content_logit` adds to the measures' classifier.

``bench/scene_backbone.py`` downloads the package and converts its weights (uint8, as shipped) into
``engine/data/scene_backbone.npz``. The forward pass is numpy (BLAS matrix products for the 1x1 convolutions,
shifted multiply-adds for the depthwise ones), so the analysis does not import torch: ~30 ms on 2 cores.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

__all__ = ["BACKBONE_PATH", "HEAD_PATH", "INPUT_SIDE", "SceneHead", "network_input", "scene_features", "scene_head",
           "stored_key", "warm_up"]

DATA = Path(__file__).resolve().parent / "data"
BACKBONE_PATH = DATA / "scene_backbone.npz"
HEAD_PATH = DATA / "scene_head.npz"
INPUT_SIDE = 224
"""The network's input: the whole image squeezed to 224x224 (as nsfwjs feeds it), RGB on [0, 1]."""

# MobileNetV2 (width 1.0) after Keras' layout: (output channels, stride) of inverted residual blocks 1-16, each
# expanding its input 6x; block 0 ("expanded_conv") has no expansion.
_BLOCKS = ((24, 2), (24, 1), (32, 2), (32, 1), (32, 1), (64, 2), (64, 1), (64, 1), (64, 1), (96, 1), (96, 1),
           (96, 1), (160, 2), (160, 1), (160, 1), (320, 1))
_BN_EPSILON = 1e-3


@dataclass(frozen=True)
class _Conv:
    """One convolution with its batch norm folded in: 1x1 (``weight`` Cin x Cout), 3x3 dense (3 x 3 x Cin x Cout)
    or 3x3 depthwise (3 x 3 x C); ReLU6 after it when ``relu6``."""

    weight: np.ndarray
    bias: np.ndarray
    stride: int
    depthwise: bool
    relu6: bool


@dataclass(frozen=True)
class SceneHead:
    """Log-odds of "anime" = ``features @ weight + bias`` on :func:`scene_features`."""

    weight: np.ndarray  # (1280,)
    bias: float

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Log-odds of each row of ``features`` (N x 1280). Pure."""
        return np.asarray(features, dtype=np.float64) @ self.weight + self.bias


def stored_key(name: str) -> str:
    """The key of the Keras tensor ``name`` ("block_1_expand/kernel") in the weights file; ``:min`` and ``:scale``
    after it hold its quantisation."""
    return name.replace("/", ":")


def _dequantised(stored: np.lib.npyio.NpzFile, name: str) -> np.ndarray:
    key = stored_key(name)
    return stored[key].astype(np.float32) * stored[key + ":scale"] + stored[key + ":min"]


def _folded(stored, conv: str, bn: str, stride: int, relu6: bool, depthwise: bool = False) -> _Conv:
    kernel = _dequantised(stored, f"{conv}/depthwise_kernel" if depthwise else f"{conv}/kernel")
    gamma, beta, mean, var = (_dequantised(stored, f"{bn}/{k}") for k in ("gamma", "beta", "moving_mean",
                                                                       "moving_variance"))
    scale = gamma / np.sqrt(var + _BN_EPSILON)
    if depthwise:
        weight = kernel[:, :, :, 0] * scale  # 3 x 3 x C (depth multiplier 1)
    elif kernel.shape[0] == 1:
        weight = kernel[0, 0] * scale  # Cin x Cout
    else:
        weight = kernel * scale
    return _Conv(np.ascontiguousarray(weight, np.float32), (beta - mean * scale).astype(np.float32), stride,
                 depthwise, relu6)


@functools.lru_cache(maxsize=1)
def _network(path: Path = BACKBONE_PATH) -> tuple[tuple[str, tuple[_Conv, ...]], ...]:
    """The backbone as stages: ("stem", convs), ("block"/"residual", expand?, depthwise, project), ("top", conv)."""
    with np.load(path) as stored:
        stages: list[tuple[str, tuple[_Conv, ...]]] = [
            ("stem", (_folded(stored, "Conv1", "bn_Conv1", 2, True),)),
            ("block", (_folded(stored, "expanded_conv_depthwise", "expanded_conv_depthwise_BN", 1, True, True),
                       _folded(stored, "expanded_conv_project", "expanded_conv_project_BN", 1, False)))]
        channels = 16
        for i, (out, stride) in enumerate(_BLOCKS, start=1):
            name = f"block_{i}"
            convs = (_folded(stored, f"{name}_expand", f"{name}_expand_BN", 1, True),
                     _folded(stored, f"{name}_depthwise", f"{name}_depthwise_BN", stride, True, True),
                     _folded(stored, f"{name}_project", f"{name}_project_BN", 1, False))
            stages.append(("residual" if stride == 1 and channels == out else "block", convs))
            channels = out
        stages.append(("top", (_folded(stored, "Conv_1", "Conv_1_bn", 1, True),)))
    return tuple(stages)


def _pad_for(size: int, stride: int) -> tuple[int, int]:
    """Keras' padding of a 3x3 convolution: "same" at stride 1; at stride 2 ``correct_pad`` (0, 1) on even sizes."""
    if stride == 1:
        return 1, 1
    return (0, 1) if size % 2 == 0 else (1, 1)


def _apply(conv: _Conv, x: np.ndarray) -> np.ndarray:
    """One folded convolution on an HxWxC float32 array."""
    if conv.weight.ndim == 2:
        h, w, c = x.shape
        y = (x.reshape(h * w, c) @ conv.weight).reshape(h, w, -1)
    else:
        top, bottom = _pad_for(x.shape[0], conv.stride)
        left, right = _pad_for(x.shape[1], conv.stride)
        z = np.pad(x, ((top, bottom), (left, right), (0, 0)))
        s = conv.stride
        h, w = (z.shape[0] - 3) // s + 1, (z.shape[1] - 3) // s + 1
        taps = [(dy, dx) for dy in range(3) for dx in range(3)]
        if conv.depthwise:
            y = z[0:s * h:s, 0:s * w:s] * conv.weight[0, 0]
            for dy, dx in taps[1:]:
                y += z[dy:dy + s * h:s, dx:dx + s * w:s] * conv.weight[dy, dx]
        else:  # the stem: 27 columns, one matrix product
            cols = np.concatenate([z[dy:dy + s * h:s, dx:dx + s * w:s] for dy, dx in taps], axis=2)
            y = (cols.reshape(h * w, -1) @ conv.weight.reshape(-1, conv.weight.shape[3])).reshape(h, w, -1)
    y += conv.bias
    if conv.relu6:
        np.clip(y, 0.0, 6.0, out=y)
    return y


def network_input(rgb: np.ndarray, alpha: np.ndarray | None = None) -> np.ndarray:
    """The network's 224x224x3 input (float32 on [0, 1]) from HxWx3 RGB on 0-255 (any float or uint8), with
    transparent pixels composited on white. Pure."""
    rgb = np.asarray(rgb, dtype=np.float32)
    if alpha is not None:
        rgb = rgb * alpha[:, :, None] + 255.0 * (1.0 - alpha[:, :, None])
    shrinking = max(rgb.shape[:2]) > INPUT_SIDE
    squeezed = cv2.resize(rgb, (INPUT_SIDE, INPUT_SIDE),
                          interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return np.clip(squeezed, 0.0, 255.0) / 255.0


def scene_features(rgb: np.ndarray, alpha: np.ndarray | None = None) -> np.ndarray:
    """The backbone's 1280 averaged features of an image (see :func:`network_input` for the arguments). Pure.

    Raises:
        FileNotFoundError: the converted weights are missing (``bench/scene_backbone.py`` makes them).
    """
    x = network_input(rgb, alpha)
    for kind, convs in _network():
        if kind == "residual":
            y = x
            for conv in convs:
                y = _apply(conv, y)
            x = x + y
        else:
            for conv in convs:
                x = _apply(conv, x)
    return x.mean(axis=(0, 1))


@functools.lru_cache(maxsize=1)
def scene_head(path: Path = HEAD_PATH) -> SceneHead:
    """The fitted head (``bench/fit_content_type.py`` writes it)."""
    with np.load(path) as stored:
        return SceneHead(stored["weight"].astype(np.float64), float(stored["bias"]))


def warm_up() -> None:
    """Read both weight files now (~0.1 s), which the first analysis would otherwise wait for. The app's warm-up
    calls this."""
    _network()
    scene_head()
