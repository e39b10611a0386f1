"""The one place that turns a weights file into a network: safe load, unwrap, build.

* :func:`read_state_dict` is the only safe load in the app: :func:`check_safe_environment`, then
  ``torch.load(path, map_location="cpu", weights_only=True)`` (memory-mapped when the file is torch's zip format,
  so a 300 MB file is not copied into memory before the network takes its weights), or ``safetensors`` for
  ``.safetensors`` files; the checkpoint is unwrapped by :func:`unwrap_state_dict`, the only unwrap.
* :func:`build_network` makes the module: `spandrel <https://github.com/chaiNNer-org/spandrel>`_ detects the
  architecture and its hyper-parameters from the tensor shapes for every architecture it knows (the catalog's
  ``RRDBNet``, ``SRVGGNetCompact``, ``GFPGANv1Clean`` and ``RestoreFormer``, see :data:`SPANDREL_ARCHITECTURES`),
  and :data:`OWN_BUILDERS` builds the few it does not (RetinaFace, ParseNet, ArcFace, LPIPS). The catalog's
  ``arch`` is the declaration the detected network is checked against. RRDBNet and SRVGGNetCompact weights in
  the official layout (every upscaler the catalog ships) are built by :mod:`engine.models.networks` instead, so
  a run that needs no other architecture never imports spandrel (1.5 s and 170 MB, see there).
* :func:`reference_network` makes the official implementation of an architecture (basicsr, realesrgan, gfpgan,
  facexlib, lpips) with random weights: the key layout of the official files, which tests use to make weights and
  to check the app's networks against. :func:`layout_network` gives the same layout without importing those
  packages where :mod:`engine.models.networks` can (the ncnn converter and the time calibration use it).
  Inference never runs the official implementation for a spandrel architecture.

The model manager (:mod:`engine.model_manager`) is the only caller in the app: it finds the file, calls these,
moves the network to its device and precision and caches it. Nothing here caches or holds state.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Mapping

from engine.errors import ModelNotAvailableError, UnsafeEnvironmentError

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "OWN_BUILDERS",
    "SPANDREL_ARCHITECTURES",
    "BuiltNetwork",
    "DetectedNetwork",
    "FACE_SIZE",
    "build_network",
    "check_safe_environment",
    "detect_network",
    "face_forward",
    "layout_network",
    "rgb_network",
    "read_state_dict",
    "reference_network",
    "unwrap_state_dict",
]

StateDict = dict[str, "torch.Tensor"]
ArchParams = Mapping[str, object]
Builder = Callable[[ArchParams, StateDict], "nn.Module"]

_UNSAFE_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
_WRAPPER_KEYS = ("params_ema", "params", "state_dict")  # BasicSR EMA weights first, as the reference code loads
_PREFIX = "module."  # left by DataParallel
FACE_SIZE = 512  # side of the aligned faces every face network takes (the FFHQ template)

#: Catalog architecture -> the spandrel architecture id that must be detected in its weights.
SPANDREL_ARCHITECTURES: Mapping[str, str] = MappingProxyType({
    "RRDBNet": "ESRGAN",
    "SRVGGNetCompact": "Compact",
    "GFPGANv1Clean": "GFPGAN",
    "RestoreFormer": "RestoreFormer",
})


# ------------------------------------------------------------------------------------------------ safe load
def check_safe_environment(environ: Mapping[str, str] | None = None) -> None:
    """Refuse to run when torch has been told to unpickle arbitrary objects.

    Args:
        environ: the environment to check; ``os.environ`` when None.

    Raises:
        UnsafeEnvironmentError: ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set to a true value.
    """
    value = (os.environ if environ is None else environ).get(_UNSAFE_ENV, "")
    if value.strip().lower() not in ("", "0", "false", "no", "off"):
        raise UnsafeEnvironmentError(
            f"{_UNSAFE_ENV} is set, which lets model files run arbitrary code when loaded. "
            f"Unset it (unset {_UNSAFE_ENV}) and start again."
        )


def unwrap_state_dict(checkpoint: object) -> StateDict:
    """The network weights of a checkpoint: ``params_ema``, else ``params``, else ``state_dict``, else the dict
    itself; a ``module.`` prefix (DataParallel) is stripped from every key that has it.

    Args:
        checkpoint: what a weights file holds.

    Returns:
        ``{key: tensor}``.

    Raises:
        ModelNotAvailableError: the checkpoint is not a dict.
    """
    if not isinstance(checkpoint, dict):
        raise ModelNotAvailableError("The weights file does not hold a state dict; it may be damaged.")
    for key in _WRAPPER_KEYS:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return {(k[len(_PREFIX):] if k.startswith(_PREFIX) else k): v for k, v in checkpoint.items()}


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Load a weights file safely and unwrap it (see the module docstring). A pickle that would run code fails.

    Args:
        path: a ``.pth``/``.pt``/``.ckpt`` file written by ``torch.save`` (zip or legacy format) or a
            ``.safetensors`` file.

    Returns:
        ``{key: tensor}`` on the CPU (memory-mapped from the file where its format allows).

    Raises:
        UnsafeEnvironmentError: see :func:`check_safe_environment`.
        ModelNotAvailableError: the file is damaged or not a plain weights file (the message names it).
    """
    check_safe_environment()
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            checkpoint = _read_safetensors(path)
        else:
            import torch

            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except ModelNotAvailableError:
        raise
    except pickle.UnpicklingError as exc:
        raise ModelNotAvailableError(
            f"Refused to load {path.name}: it is damaged or not a plain weights file — it holds Python objects that "
            f"would run code when loaded ({_first_line(exc)}). Only tensors are loaded; ask for a .safetensors file "
            "or a plain state dict."
        ) from exc
    except (RuntimeError, EOFError, ValueError, AttributeError, TypeError, IndexError,
            KeyError, UnicodeDecodeError, OSError) as exc:
        raise ModelNotAvailableError(
            f"Could not load weights from {path.name}: {_first_line(exc)}. "
            "The file is damaged or not a plain weights file; delete it and download it again."
        ) from exc
    return unwrap_state_dict(checkpoint)


def _read_safetensors(path: Path) -> dict:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ModelNotAvailableError(f"{path.name} is a safetensors file; install safetensors "
                                     "(pip install safetensors) to load it.") from exc
    try:
        return load_file(path, device="cpu")
    except SafetensorError as exc:
        raise ValueError(str(exc)) from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


# ---------------------------------------------------------------------------------------------------- build
@dataclass(frozen=True)
class BuiltNetwork:
    """A network with its weights, as :func:`build_network` returns it.

    Attributes:
        module: the ``nn.Module``: float32, on the CPU, eval mode, gradients off.
        architecture: what was built: the spandrel architecture id (``"ESRGAN"``, ``"Compact"``, ``"GFPGAN"``,
            ``"RestoreFormer"``) or the catalog architecture of an own builder (``"RetinaFace"``, …).
        scale: output size / input size of an image network (1 for everything else).
        input_channels: image channels the network takes (3 for RGB).
        output_channels: image channels it gives.
        supports_half: float16 inference is faithful (spandrel's judgement; False for own builders).
        supports_bfloat16: bfloat16 inference is faithful (spandrel's judgement; False for own builders).
    """

    module: nn.Module
    architecture: str
    scale: int = 1
    input_channels: int = 3
    output_channels: int = 3
    supports_half: bool = False
    supports_bfloat16: bool = False


def build_network(arch: str, state_dict: StateDict, arch_params: ArchParams | None = None) -> BuiltNetwork:
    """Build the network that ``state_dict`` holds.

    Args:
        arch: the catalog's declared architecture (``ModelSpec.arch``). A spandrel architecture is detected from
            the weights and must be this one; any other must have an entry in :data:`OWN_BUILDERS`.
        state_dict: unwrapped weights (:func:`read_state_dict`).
        arch_params: the catalog's declared hyper-parameters. For a spandrel architecture only the declared
            scale (``scale``/``upscale``) is checked against the detected one; own builders construct with them.

    Returns:
        A :class:`BuiltNetwork`; its module is float32 on the CPU, in eval mode, with gradients off.

    Raises:
        ModelNotAvailableError: no builder for ``arch``, or the weights are not a network of that architecture
            (the message says what they hold and what to do).
    """
    params: ArchParams = arch_params or {}
    if arch in SPANDREL_ARCHITECTURES or arch in spandrel_ids():
        built = _build_official(arch, state_dict, params) or _build_with_spandrel(arch, state_dict, params)
    elif arch in OWN_BUILDERS:
        try:
            module = OWN_BUILDERS[arch](params, state_dict)
        except (RuntimeError, KeyError, ValueError) as exc:  # load_state_dict: missing keys or wrong shapes
            raise ModelNotAvailableError(
                f"The weights are not a {arch} network ({_first_line(exc)}); use the official file of the model."
            ) from exc
        built = BuiltNetwork(module=module, architecture=arch)
    else:
        raise ModelNotAvailableError(f"No loader for the architecture {arch!r}; known: "
                                     f"{', '.join([*SPANDREL_ARCHITECTURES, *OWN_BUILDERS])}.")
    built.module.eval().requires_grad_(False)
    logger.debug("built %s (%s, x%d)", arch, built.architecture, built.scale)
    return built


def _build_official(arch: str, state_dict: StateDict, params: ArchParams) -> BuiltNetwork | None:
    """The catalog's RRDBNet or SRVGGNetCompact in the official key layout, without importing spandrel
    (:mod:`engine.models.networks`); None for any other architecture or layout."""
    from engine.models.networks import build_official

    official = build_official(arch, state_dict)
    if official is None:
        return None
    module, found = official
    scale = int(found.get("scale", found.get("upscale")))
    _check_declared_scale(arch, scale, params)
    return BuiltNetwork(module=module, architecture=SPANDREL_ARCHITECTURES[arch], scale=scale,
                        input_channels=int(found["num_in_ch"]), output_channels=int(found["num_out_ch"]),
                        supports_half=True, supports_bfloat16=True)  # as spandrel judges ESRGAN and Compact


def _check_declared_scale(arch: str, scale: int, params: ArchParams) -> None:
    declared = params.get("scale", params.get("upscale"))
    if declared is not None and int(declared) != scale:
        raise ModelNotAvailableError(f"The weights are a x{scale} {arch} network, the catalog declares "
                                     f"x{declared}; use the official file of the model.")


def _build_with_spandrel(arch: str, state_dict: StateDict, params: ArchParams) -> BuiltNetwork:
    from spandrel import ImageModelDescriptor, UnsupportedModelError

    expected = SPANDREL_ARCHITECTURES.get(arch, arch)
    try:
        descriptor = _spandrel_registry().load(state_dict)
    except UnsupportedModelError as exc:
        raise ModelNotAvailableError(f"The weights are not a network spandrel knows (expected {arch}); use the "
                                     "official file of the model.") from exc
    except (RuntimeError, KeyError, ValueError, IndexError, AssertionError) as exc:  # detected, but inconsistent
        raise ModelNotAvailableError(f"The weights look like {arch} but do not fit it ({_first_line(exc)}); "
                                     "the file is damaged or a variant this app cannot run.") from exc
    found = str(descriptor.architecture.id)
    if found != expected or not isinstance(descriptor, ImageModelDescriptor):
        raise ModelNotAvailableError(f"The weights hold a {found} network, not the {arch} ({expected}) the "
                                     "catalog declares; use the official file of the model.")
    _check_declared_scale(arch, int(descriptor.scale), params)
    return BuiltNetwork(module=descriptor.model, architecture=found, scale=int(descriptor.scale),
                        input_channels=int(descriptor.input_channels),
                        output_channels=int(descriptor.output_channels),
                        supports_half=bool(descriptor.supports_half),
                        supports_bfloat16=bool(descriptor.supports_bfloat16))


@dataclass(frozen=True)
class DetectedNetwork:
    """What a state dict holds, as spandrel reads it from the tensor shapes (:func:`detect_network`).

    Attributes:
        built: the network (float32, CPU, eval mode) and its architecture id, scale, channels, fp16/bf16 support.
        purpose: spandrel's purpose (``"SR"``, ``"Restoration"`` for 1× models, ``"FaceSR"``, ``"Inpainting"``...).
        size_multiple: input sides must be multiples of this (spandrel's size requirement, and the attention
            window of window-attention networks so tiles see the same windows as the whole image).
        min_size: the smallest input side the network takes.
        square: the network takes square inputs only.
        tiling: spandrel's advice: ``"supported"``, ``"discouraged"`` or ``"internal"``.
        tags: spandrel's short description of the hyper-parameters (``"64nf"``, ``"23nb"``...).
    """

    built: BuiltNetwork
    purpose: str
    size_multiple: int = 1
    min_size: int = 1
    square: bool = False
    tiling: str = "supported"
    tags: tuple[str, ...] = ()


def spandrel_ids() -> frozenset[str]:
    """Every architecture id spandrel's registry knows (``"ESRGAN"``, ``"SwinIR"``, ``"SPAN"``...)."""
    return frozenset(str(support.architecture.id) for support in _spandrel_registry().architectures())


def detect_network(state_dict: StateDict) -> DetectedNetwork:
    """Detect the architecture and hyper-parameters of ``state_dict`` (any architecture spandrel knows) and build it.

    Args:
        state_dict: unwrapped weights (:func:`read_state_dict`).

    Returns:
        A :class:`DetectedNetwork`.

    Raises:
        ModelNotAvailableError: no known architecture has these tensors, or the detected one does not fit them
            (the message says which, and what to do).
    """
    from spandrel import ImageModelDescriptor, UnsupportedModelError

    try:
        descriptor = _spandrel_registry().load(state_dict)
    except UnsupportedModelError as exc:
        sample = ", ".join(list(state_dict)[:3])
        raise ModelNotAvailableError(
            f"Unknown architecture: none of the {len(spandrel_ids())} architectures this app can run fits these "
            f"{len(state_dict)} tensors (first keys: {sample}). Use a model for an architecture spandrel supports "
            "(ESRGAN, Real-ESRGAN Compact, SwinIR, SPAN, HAT, DAT, ...).") from exc
    except (RuntimeError, KeyError, ValueError, IndexError, AssertionError) as exc:
        raise ModelNotAvailableError(f"The weights look like a known architecture but do not fit it "
                                     f"({_first_line(exc)}); the file is damaged or a variant this app cannot "
                                     "run.") from exc
    if not isinstance(descriptor, ImageModelDescriptor):
        raise ModelNotAvailableError(f"The weights hold a {descriptor.architecture.name} network, which does not "
                                     "turn one image into another (e.g. inpainting); it cannot upscale.")
    module = descriptor.model.eval().requires_grad_(False)
    size = descriptor.size_requirements
    window = getattr(module, "window_size", None)
    multiple = math.lcm(int(size.multiple_of), int(window) if isinstance(window, int) and window > 0 else 1)
    built = BuiltNetwork(module=module, architecture=str(descriptor.architecture.id), scale=int(descriptor.scale),
                         input_channels=int(descriptor.input_channels),
                         output_channels=int(descriptor.output_channels),
                         supports_half=bool(descriptor.supports_half),
                         supports_bfloat16=bool(descriptor.supports_bfloat16))
    return DetectedNetwork(built=built, purpose=str(descriptor.purpose), size_multiple=multiple,
                           min_size=int(size.minimum), square=bool(size.square),
                           tiling=str(getattr(descriptor.tiling, "name", "SUPPORTED")).lower(),
                           tags=tuple(str(t) for t in descriptor.tags))


def rgb_network(module: nn.Module, input_channels: int, output_channels: int) -> nn.Module:
    """``module`` taking and giving Nx3xHxW RGB, as the engine runs every super-resolution network.

    A gray network (1 channel) gets the mean of R, G and B and its output is repeated to three channels; an RGBA
    network (4) gets an opaque alpha and its colour is kept (the engine upscales alpha itself). An RGB network is
    returned as it is.

    Raises:
        ModelNotAvailableError: a channel count other than 1, 3 or 4.
    """
    if (input_channels, output_channels) == (3, 3):
        return module
    if input_channels not in (1, 3, 4) or output_channels not in (1, 3, 4):
        raise ModelNotAvailableError(f"A network with {input_channels} input and {output_channels} output "
                                     "channels is not an image model this app can run (1, 3 or 4 channels).")
    import torch

    class RGBAdapter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if input_channels == 1:
                x = x.mean(dim=1, keepdim=True)
            elif input_channels == 4:
                x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
            y = self.net(x)
            return y.expand(-1, 3, -1, -1) if output_channels == 1 else y[:, :3]

    return RGBAdapter()


def face_forward(net: nn.Module, arch: str, faces: torch.Tensor) -> torch.Tensor:
    """A face network's output for ``Nx3x512x512`` aligned faces in [-1, 1]: the restored faces, same shape.

    ``arch`` is the catalog architecture. GFPGAN runs with its stored noise (``randomize_noise=False``) so the same
    input gives the same bytes; every face network returns a tuple whose first item is the image.
    """
    if arch == "GFPGANv1Clean":
        return net(faces, return_rgb=False, randomize_noise=False)[0]
    return net(faces)[0]


@functools.lru_cache(maxsize=1)
def _spandrel_registry():
    """spandrel's registry, with GFPGAN's width read from the weights (built on first use, never mutated).

    spandrel builds GFPGANv1Clean at the official width only (narrow 1, channel multiplier 2); reading both from
    the tensor shapes gives the same network for the official files and also runs narrower GFPGANs.
    """
    from spandrel import MAIN_REGISTRY, ArchRegistry, ArchSupport, ImageModelDescriptor, SizeRequirements
    from spandrel.architectures.GFPGAN import GFPGAN, GFPGANArch

    class GFPGANAnyWidth(GFPGANArch):
        def load(self, state_dict):
            narrow = state_dict["final_conv.weight"].shape[0] / 256  # channels["4"] = 512 * narrow / 2
            multiplier = round(state_dict["conv_body_first.weight"].shape[0] / (16 * narrow))
            model = GFPGAN(narrow=narrow, channel_multiplier=multiplier)  # the other defaults are GFPGAN's
            return ImageModelDescriptor(
                model, state_dict, architecture=self, purpose="FaceSR", tags=[], supports_half=False,
                supports_bfloat16=True, scale=1, input_channels=3, output_channels=3,
                size_requirements=SizeRequirements(minimum=512), call_fn=lambda net, image: net(image)[0])

    registry = ArchRegistry()
    registry.add(*(ArchSupport.from_architecture(GFPGANAnyWidth(), support.before)
                   if support.architecture.id == "GFPGAN" else support for support in MAIN_REGISTRY))
    return registry


# ------------------------------------------------------------------------------- official implementations
@dataclass(frozen=True)
class _Official:
    """Where the official implementation of an architecture lives and how the catalog's parameters map onto it."""

    module: str
    name: str
    kwargs: Callable[[ArchParams], dict] = dict

    def load_class(self) -> type[nn.Module]:
        from utils.compat import install_torchvision_shim

        install_torchvision_shim()  # basicsr, realesrgan, gfpgan and facexlib need it before import
        return getattr(importlib.import_module(self.module), self.name)

    def construct(self, cls: type[nn.Module], params: ArchParams) -> nn.Module:
        with warnings.catch_warnings():  # torchvision's `pretrained=False` deprecation (lpips, RetinaFace)
            warnings.simplefilter("ignore", UserWarning)
            return cls(**self.kwargs(params))


def _retinaface_kwargs(params: ArchParams) -> dict:
    import torch

    # facexlib's own detect_faces keeps per-image state on the module; engine.face_detect decodes statelessly.
    return dict(network_name=str(params.get("network_name", "resnet50")), half=False, device=torch.device("cpu"))


_OFFICIAL: Mapping[str, _Official] = MappingProxyType({
    "RRDBNet": _Official("basicsr.archs.rrdbnet_arch", "RRDBNet"),
    "SRVGGNetCompact": _Official("realesrgan.archs.srvgg_arch", "SRVGGNetCompact"),
    "GFPGANv1Clean": _Official("gfpgan.archs.gfpganv1_clean_arch", "GFPGANv1Clean"),
    "RestoreFormer": _Official("gfpgan.archs.restoreformer_arch", "RestoreFormer"),
    "RetinaFace": _Official("facexlib.detection.retinaface", "RetinaFace", _retinaface_kwargs),
    "ParseNet": _Official("facexlib.parsing.parsenet", "ParseNet"),
    "ArcFaceIRSE50": _Official("facexlib.recognition.arcface_arch", "Backbone"),
    "LPIPSLinear": _Official("lpips", "LPIPS", lambda params: dict(net="alex", version="0.1", pretrained=False,
                                                                  pnet_rand=True, verbose=False)),
})


def reference_network(arch: str, arch_params: ArchParams, device: str | torch.device | None = None) -> nn.Module:
    """The official implementation of ``arch`` with random weights (train mode, as constructed).

    Its ``state_dict()`` has the key layout of the official weights files: the ncnn converter fills it, and tests
    save it to make weights. For a spandrel architecture the app's inference runs :func:`build_network`'s module,
    never this one.

    Args:
        arch: a catalog architecture (``RRDBNet``, ``SRVGGNetCompact``, ``GFPGANv1Clean``, ``RestoreFormer``,
            ``RetinaFace``, ``ParseNet``, ``ArcFaceIRSE50``, ``LPIPSLinear``).
        arch_params: its hyper-parameters (the catalog's ``arch_params``).
        device: where to create the parameters (default: the CPU); ``"meta"`` gives shapes only, at no memory
            or initialisation cost.

    Raises:
        ModelNotAvailableError: an unknown architecture.
    """
    official = _OFFICIAL.get(arch)
    if official is None:
        raise ModelNotAvailableError(f"No reference implementation of {arch!r}; known: {', '.join(_OFFICIAL)}.")
    cls = official.load_class()  # import outside the device context
    if device is None:
        return official.construct(cls, arch_params)
    import torch

    with torch.device(device):
        return official.construct(cls, arch_params)


def layout_network(arch: str, arch_params: ArchParams, device: str | torch.device | None = None) -> nn.Module:
    """A network of ``arch`` with random weights and the key layout of the official files, made as cheaply as
    possible: the app's own module for RRDBNet and SRVGGNetCompact (:mod:`engine.models.networks`, without
    importing basicsr and torchvision), :func:`reference_network` for the others. For the ncnn converter (on the
    meta device) and the time calibration (random weights: only the time counts).

    Raises:
        ModelNotAvailableError: an unknown architecture.
    """
    from engine.models import networks

    if arch not in networks.ARCHITECTURES:
        return reference_network(arch, arch_params, device)
    import torch

    with torch.device(device or "cpu"):
        return networks.new_network(arch, arch_params)


# ------------------------------------------------------------------------------------- our own few builders
def _strict(arch: str) -> Builder:
    """A builder that constructs the official implementation and loads every key of the weights into it."""

    def build(params: ArchParams, state_dict: StateDict) -> nn.Module:
        module = reference_network(arch, params)
        module.load_state_dict(state_dict, strict=True)
        return module

    return build


def _build_lpips(params: ArchParams, state_dict: StateDict) -> nn.Module:
    """LPIPS (AlexNet, v0.1) from torchvision's AlexNet weights (``features.N.*``) and the LPIPS linear layers
    (``linK.model.1.weight``), given together in one dict (the model manager merges the two files)."""
    net = reference_network("LPIPSLinear", params)
    state = {f"net.{slice_name}.{key}": state_dict[f"features.{key}"]  # torchvision features.N -> sliceK.N
             for slice_name, module in net.net.named_children() for key in module.state_dict()}
    state.update({k: v for k, v in state_dict.items() if k.startswith("lin")})
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("scaling_layer.", "lins."))]  # lins: aliases of lin0-4
    if missing or unexpected:
        raise ValueError(f"the LPIPS weights do not fit the network (missing {missing}, unexpected {unexpected})")
    return net


#: Architectures spandrel does not cover: catalog architecture -> ``build(arch_params, state_dict) -> module``.
OWN_BUILDERS: dict[str, Builder] = {
    "RetinaFace": _strict("RetinaFace"),
    "ParseNet": _strict("ParseNet"),
    "ArcFaceIRSE50": _strict("ArcFaceIRSE50"),
    "LPIPSLinear": _build_lpips,
}
