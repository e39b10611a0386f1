"""Device detection, memory figures and system info. Imports torch lazily; nothing happens at import."""

from __future__ import annotations

import functools
import logging
import platform
import re
from dataclasses import asdict, dataclass
from typing import Literal

from utils.errors import InvalidSettingsError

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "bf16"]


@dataclass(frozen=True)
class DeviceInfo:
    name: str  # "cpu", "cuda:0", "mps"
    label: str  # human readable
    total_bytes: int | None
    free_bytes: int | None


def resolve_device(requested: str = "auto"):
    """Turn a device string into a ``torch.device``.

    ``auto`` picks ``cuda:0`` when CUDA works, then ``mps``, then ``cpu``. ``cuda`` means ``cuda:0`` and
    ``cuda:N`` really means GPU N (0 is a valid index, never "unset").

    Raises:
        InvalidSettingsError: the device is malformed or not present on this machine, saying which devices are
            (a ``ValueError``).
    """
    import torch

    requested = (requested or "auto").strip().lower()
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "mps":
        if not _mps_available():
            raise InvalidSettingsError("Device 'mps' was requested but Apple Metal is not available; "
                                       "use 'cpu' or 'auto'.")
        return torch.device("mps")
    if requested == "cuda" or requested.startswith("cuda:"):
        index_text = requested.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise InvalidSettingsError(f"Malformed device {requested!r}: use cuda or cuda:N with N a GPU index.")
        index = int(index_text)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            have = ", ".join(f"cuda:{i}" for i in range(count)) or "no CUDA GPU"
            raise InvalidSettingsError(f"Device {requested!r} was requested but this machine has {have}; "
                                       "use 'cpu' or 'auto'.")
        return torch.device("cuda", index)
    raise InvalidSettingsError(f"Unknown device {requested!r}: use auto, cpu, cuda, cuda:N or mps.")


_CUDA_LIBRARY = re.compile(r"/site-packages/(nvidia|cuda)/|/torch/lib/lib[^/]*cuda[^/]*\.so")
"""Paths of the CUDA libraries that torch's CUDA build loads at import: the nvidia-* and cuda-bindings packages,
torch's own ``libtorch_cuda.so`` and ``libc10_cuda.so``."""


@functools.lru_cache(maxsize=1)
def release_unusable_cuda_libraries() -> int:
    """On a machine where CUDA does not work, let go of the resident pages of the CUDA libraries that torch's CUDA
    build maps at import even there: 150-250 MB of the process's RSS with the registry's torch 2.14.1+cu130,
    depending on how much of them the page cache held (see ``bench/bench_memory.py``). Returns the bytes released
    (0 when CUDA works, or where :func:`utils.allocator.drop_mapped_file_pages` cannot). Once per process; costs
    nothing later, since a page that is touched again is mapped back from the page cache."""
    import torch

    from utils.allocator import drop_mapped_file_pages

    if torch.cuda.is_available():
        return 0
    released = drop_mapped_file_pages(_CUDA_LIBRARY) or 0
    logger.debug("No CUDA here: %d MB of the CUDA libraries' pages let go", released >> 20)
    return released


def default_precision(device) -> Precision:
    """fp16 on CUDA, fp32 on CPU and MPS (bf16 on CPU is an explicit opt-in)."""
    return "fp16" if getattr(device, "type", str(device)).startswith("cuda") else "fp32"


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when this CPU has bf16 instructions (AVX512-BF16 or AMX) and oneDNN to use them; elsewhere bf16 is
    emulated and runs several times slower than fp32 (RealESRGAN_x4plus at 256² on a 2-core AVX2 CPU: 169 s against
    27 s). oneDNN's own "bf16 supported" says yes to any AVX-512 CPU, where it emulates bf16 too."""
    import torch

    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return bool(native and torch.backends.mkldnn.is_available())
    except (AttributeError, RuntimeError):
        return False


def torch_dtype(precision: Precision):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def free_memory_bytes(device) -> int:
    """Free memory usable for inference on ``device``: free VRAM on CUDA, available RAM otherwise."""
    import psutil

    if getattr(device, "type", "cpu") == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def clear_cache(device=None) -> None:
    """Release cached GPU memory after heavy stages (no-op on CPU)."""
    import torch

    if torch.cuda.is_available() and (device is None or getattr(device, "type", "") == "cuda"):
        torch.cuda.empty_cache()
    if device is not None and getattr(device, "type", "") == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA/MPS/CPU allocation failures (torch raises several types for them)."""
    import torch

    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and ("out of memory" in text or isinstance(exc, MemoryError))


def list_devices() -> list[DeviceInfo]:
    import psutil
    import torch

    vm = psutil.virtual_memory()
    devices = [DeviceInfo("cpu", f"CPU ({platform.processor() or platform.machine()}, {psutil.cpu_count()} threads)",
                          int(vm.total), int(vm.available))]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            devices.append(DeviceInfo(f"cuda:{index}", torch.cuda.get_device_name(index), int(total), int(free)))
    if _mps_available():
        devices.append(DeviceInfo("mps", "Apple Metal (MPS)", None, None))
    return devices


def system_info() -> dict:
    """Versions and devices for the System Info tab and `--json` reports."""
    import psutil
    import torch

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": psutil.cpu_count(),
        "ram_total_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "ram_available_gb": round(psutil.virtual_memory().available / 2**30, 1),
        "devices": [asdict(d) for d in list_devices()],
    }
    if torch.cuda.is_available():
        try:
            info["driver_version"] = torch.cuda.get_device_properties(0).name and _nvidia_driver_version()
        except Exception as exc:  # driver query is informational only
            logger.debug("driver version unavailable: %s", exc)
            info["driver_version"] = None
    return info


def _nvidia_driver_version() -> str | None:
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=10)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
