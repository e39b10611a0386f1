"""Compatibility with the pinned basicsr 1.4.2 on modern torchvision.

basicsr 1.4.2 imports ``torchvision.transforms.functional_tensor``, which torchvision 0.17 removed (its one
function basicsr uses, ``rgb_to_grayscale``, lives in ``torchvision.transforms.functional``). Call
:func:`import_basicsr_safely` (or :func:`install_torchvision_shim`) before importing basicsr, realesrgan,
gfpgan or facexlib. Nothing happens at import of this module.
"""

from __future__ import annotations

import importlib
import sys
import types

_SHIM_NAME = "torchvision.transforms.functional_tensor"


def install_torchvision_shim() -> None:
    """Register the removed torchvision module as an alias, if torchvision lacks it. Idempotent."""
    if _SHIM_NAME in sys.modules:
        return
    try:
        importlib.import_module(_SHIM_NAME)
        return
    except ImportError:
        pass
    from torchvision.transforms import functional

    shim = types.ModuleType(_SHIM_NAME)
    shim.rgb_to_grayscale = functional.rgb_to_grayscale
    sys.modules[_SHIM_NAME] = shim


def import_basicsr_safely() -> None:
    """Install the shim and import basicsr's architectures once."""
    install_torchvision_shim()
    importlib.import_module("basicsr.archs.rrdbnet_arch")
