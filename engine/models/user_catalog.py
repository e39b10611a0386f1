"""The user's own super-resolution and face-restoration models: their persisted catalog beside the official one,
and their import.

An import (:meth:`UserCatalog.import_model`, from a local path or an http(s) URL) is refused unless every step
holds: the file is a ``.pth``/``.pt``/``.ckpt``/``.safetensors`` file; its SHA-256 matches the one given (the hash
is pinned in the catalog either way and checked again whenever the model loads); it loads through the app's one
safe load (:func:`engine.models.loader.read_state_dict`: tensors only, a pickle that would run code is refused);
spandrel recognises its architecture; and it turns an image into an image (a face network: one the face enhancer
runs, GFPGAN or RestoreFormer, on 512×512 aligned faces). Then the network is measured once on a small input
(multiply-accumulates per pixel for time estimates; the receptive radius for the tile overlap where the engine has
no rule for the architecture), the file is moved into ``<weights dir>/custom/`` with an atomic rename and its entry
written to ``<weights dir>/user_models.json``.

The catalog file is rewritten whole, to a temporary file that is fsynced and renamed over the old one, under a
file lock: a crash leaves the old catalog or the new one, never half of one, and two processes do not lose each
other's imports. :meth:`UserCatalog.specs` gives the entries as :class:`~engine.catalog.ModelSpec` so the model
manager, the engine and the advisor treat them like the official models.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
import shutil
import threading
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Literal, Mapping, get_args

from engine.catalog import CATALOG, ModelSpec
from engine.errors import ChecksumMismatchError, InvalidInputError, InvalidSettingsError, ModelNotAvailableError
from engine.models.loader import SPANDREL_ARCHITECTURES
from utils.atomic import fsync_dir, write_atomic

logger = logging.getLogger(__name__)

__all__ = ["KINDS", "SUFFIXES", "UserCatalog", "UserModel", "user_catalog_for"]

Kind = Literal["photo", "anime", "text", "general", "face"]
KINDS: tuple[str, ...] = get_args(Kind)
SUFFIXES: tuple[str, ...] = (".pth", ".pt", ".ckpt", ".safetensors")
CATALOG_FILE = "user_models.json"
MODELS_DIR = "custom"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PURPOSES = ("SR", "Restoration")  # image → image networks the upscaler can run
_FACE_PURPOSE = "FaceSR"
_FACE_ARCHITECTURES = ("GFPGAN", "RestoreFormer")  # the face networks engine.face_enhancer runs
_MAX_OVERLAP = 64  # input pixels: beyond this, more context costs more than the seams it hides
_PROBE_SIDE = 32  # input side of the measuring run (a multiple of 8, 16 and 32: most size requirements)
#: spandrel id -> the catalog's name of that architecture, so the engine's rules for it apply (RRDBNet overlap...).
_ARCH_OF = MappingProxyType({spandrel_id: arch for arch, spandrel_id in SPANDREL_ARCHITECTURES.items()})

Progress = Callable[[int, "int | None"], None]


@dataclass(frozen=True)
class UserModel:
    """One imported model, as stored in the user catalog (JSON-safe fields only).

    Attributes:
        name: unique among the official and the user's models.
        architecture: spandrel's architecture id (``"ESRGAN"``, ``"Compact"``, ``"SwinIR"``, ``"SPAN"``...).
        scale: output size / input size (1 for denoise / dejpeg models).
        kind: what it is for: photo, anime, text or general (super-resolution models), or face (a face-restoration
            network, offered as a face model).
        sha256, size_bytes: the file's, pinned at import.
        filename: the file, relative to the weights dir (``custom/<name>-<hash8>.<ext>``).
        input_channels, output_channels: 1 gray, 3 RGB, 4 RGBA.
        size_multiple: input sides must be multiples of this.
        min_size: the smallest input side the network takes.
        supports_half, supports_bfloat16: spandrel's judgement of fp16/bf16 inference.
        overlap: measured receptive radius in input pixels (the tile overlap it needs, at most 64); None where the
            engine has a rule for the architecture (ESRGAN, Compact).
        macs_per_pixel: measured multiply-accumulates per input pixel (time estimates).
        license, source: what the user gave (licence text or SPDX id; where the file came from).
        added: UTC date and time of the import (ISO 8601).
        tags: spandrel's short description of the hyper-parameters.
    """

    name: str
    architecture: str
    scale: int
    kind: str
    sha256: str
    size_bytes: int
    filename: str
    input_channels: int = 3
    output_channels: int = 3
    size_multiple: int = 1
    min_size: int = 1
    supports_half: bool = False
    supports_bfloat16: bool = False
    overlap: int | None = None
    macs_per_pixel: int = 0
    license: str = ""
    source: str = ""
    added: str = ""
    tags: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> "UserModel":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["tags"] = tuple(values.get("tags") or ())
        return cls(**values)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"tags": list(self.tags)}

    def spec(self) -> ModelSpec:
        """This model as a catalog entry: the engine, the model manager and the advisor read it like an official one."""
        arch = _ARCH_OF.get(self.architecture, self.architecture)
        channels = {1: "gray", 3: "RGB", 4: "RGBA"}.get(self.input_channels, f"{self.input_channels}-channel")
        face = self.kind == "face"
        return ModelSpec(
            name=self.name, kind="face" if face else "sr", arch=arch,  # type: ignore[arg-type]
            arch_params=MappingProxyType({"scale": self.scale}),
            scale=self.scale, url=None, filename=self.filename, sha256=self.sha256, size_bytes=self.size_bytes,
            license=self.license or "unknown (your own model)", supports_half=self.supports_half,
            supports_bfloat16=self.supports_bfloat16, macs_per_pixel=self.macs_per_pixel,
            description=(f"your face model ({self.architecture})" if face
                         else f"your {self.kind} model ({self.architecture}, {channels})"),
            content=self.kind if self.kind in ("photo", "anime") else "any",  # type: ignore[arg-type]
            input_channels=self.input_channels, output_channels=self.output_channels,
            size_multiple=self.size_multiple, overlap=self.overlap, tag=self.kind)


class UserCatalog:
    """The user catalog of one weights dir. Thread- and process-safe; reads are cheap (cached until the file
    changes), so :meth:`specs` may be called for every settings check."""

    def __init__(self, weights_dir: str | os.PathLike):
        self.weights_dir = Path(weights_dir)
        self.path = self.weights_dir / CATALOG_FILE
        self.models_dir = self.weights_dir / MODELS_DIR
        self._cache: tuple[tuple[int, int] | None, Mapping[str, UserModel]] = (None, MappingProxyType({}))
        self._specs: tuple[Mapping[str, UserModel] | None, Mapping[str, ModelSpec]] = (None, MappingProxyType({}))
        self._guard = threading.Lock()

    # ------------------------------------------------------------------ reading
    def entries(self) -> Mapping[str, UserModel]:
        """The imported models by name (empty when nothing was imported; a damaged file is logged and ignored,
        and refuses writes until it is fixed or deleted)."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return MappingProxyType({})
        key = (stat.st_mtime_ns, stat.st_size)
        with self._guard:
            if self._cache[0] == key:
                return self._cache[1]
        try:
            models = self._read()
        except InvalidInputError as exc:
            logger.warning("%s", exc)
            models = {}
        view = MappingProxyType(models)
        with self._guard:
            self._cache = (key, view)
        return view

    def specs(self) -> Mapping[str, ModelSpec]:
        """The entries as catalog entries (built once per change of the file)."""
        entries = self.entries()
        with self._guard:
            if self._specs[0] is entries:
                return self._specs[1]
        specs = MappingProxyType({name: model.spec() for name, model in entries.items()})
        with self._guard:
            self._specs = (entries, specs)
        return specs

    def _read(self) -> dict[str, UserModel]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return {m["name"]: UserModel.from_dict(m) for m in data["models"]}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidInputError(f"The user model catalog {self.path} is damaged ({exc}); fix it or delete it "
                                    "and import your models again.") from exc

    # ------------------------------------------------------------------ writing
    def _lock(self):
        from filelock import FileLock

        self.weights_dir.mkdir(parents=True, exist_ok=True)
        return FileLock(f"{self.path}.lock")

    def _write(self, models: Mapping[str, UserModel]) -> None:
        text = json.dumps({"version": 1, "models": [m.as_dict() for m in models.values()]}, indent=2)
        write_atomic(self.path, text.encode("utf-8"))

    def remove(self, name: str) -> UserModel:
        """Take ``name`` out of the catalog and delete its file.

        Raises:
            InvalidSettingsError: ``name`` is an official model, or not in the user catalog.
        """
        if name in CATALOG:
            raise InvalidSettingsError(f"{name} is one of the app's own models; only imported models can be removed.")
        with self._lock():
            models = self._read()
            if name not in models:
                raise InvalidSettingsError(f"No imported model is called {name!r}; see: python main.py models list.")
            model = models.pop(name)
            self._write(models)
            (self.weights_dir / model.filename).unlink(missing_ok=True)
        logger.info("Removed the user model %s", name)
        return model

    # ------------------------------------------------------------------ importing
    def import_model(self, source: str, *, name: str | None = None, kind: str = "general", sha256: str | None = None,
                     license: str = "", policy=None, progress: Progress | None = None) -> UserModel:
        """Import a weights file from a local path or an http(s) URL (see the module docstring).

        Args:
            source: a path, or an ``http://``/``https://`` URL (downloaded with ``policy``, resumable, verified).
            name: the name to list it under (default: the file's stem).
            kind: photo, anime, text or general (what the advisor offers it for); face for a face-restoration
                network (detected from the weights either way: "general" is taken as "face" for one).
            sha256: the expected SHA-256 (hex); the file is refused when it differs.
            license: its licence, shown beside it.
            policy: a :class:`engine.downloader.DownloadPolicy` for URLs (default: the downloader's).
            progress: ``progress(bytes_done, total_or_None)`` while a URL downloads.

        Returns:
            The new catalog entry.

        Raises:
            InvalidSettingsError: a bad name, kind or hash, or a name already taken.
            InvalidInputError: no such file, a file type that is no weights file, a file that would run code when
                loaded, an unknown architecture, a network that does not upscale images (or, for ``kind="face"``,
                does not restore faces), or a face network the face enhancer cannot run.
            ChecksumMismatchError: the file's SHA-256 is not ``sha256``.
            DownloadError: the URL could not be downloaded.
        """
        is_url = source.lower().startswith(("http://", "https://"))
        file_name = Path(urllib.parse.unquote(urllib.parse.urlparse(source).path)).name if is_url else Path(source).name
        suffix = Path(file_name).suffix.lower()
        name = name or Path(file_name).stem
        expected = self._check_request(name, kind, sha256, suffix)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        incoming = self.models_dir / f".incoming-{uuid.uuid4().hex}{suffix}"
        try:
            actual = self._fetch(source, is_url, incoming, expected, name, policy, progress)
            if expected is not None and actual != expected:
                raise ChecksumMismatchError(name, expected, actual)
            model = _inspect(incoming, name=name, kind=kind, sha256=actual, license=license,
                             source=source if is_url else f"file {file_name}")
            return self._publish(incoming, model, suffix)
        finally:
            incoming.unlink(missing_ok=True)
            for leftover in (".part", ".lock"):  # an interrupted download's part file, the downloader's lock
                incoming.with_name(incoming.name + leftover).unlink(missing_ok=True)

    def _check_request(self, name: str, kind: str, sha256: str | None, suffix: str) -> str | None:
        if suffix not in SUFFIXES:
            raise InvalidInputError(f"{suffix or 'A file without extension'} is not a weights file this app imports; "
                                    f"use one of {', '.join(SUFFIXES)}.")
        if not _NAME.match(name):
            raise InvalidSettingsError(f"Model name {name!r} is not allowed: use up to 64 letters, digits, '.', '_', "
                                       "'+' or '-', starting with a letter or digit (pass --name).")
        if kind not in KINDS:
            raise InvalidSettingsError(f"Kind must be one of {', '.join(KINDS)}, got {kind!r}.")
        expected = sha256.strip().lower() if sha256 else None
        if expected is not None and not _SHA256.match(expected):
            raise InvalidSettingsError("The SHA-256 must be 64 hexadecimal digits.")
        self._check_free(name, self.entries())
        return expected

    @staticmethod
    def _check_free(name: str, models: Mapping[str, UserModel]) -> None:
        if name in CATALOG or name == "auto":
            raise InvalidSettingsError(f"{name} is the name of one of the app's own models; choose another with "
                                       "--name.")
        if name in models:
            raise InvalidSettingsError(f"A model called {name} is already imported; choose another name with --name, "
                                       f"or remove it first (python main.py models remove {name}).")

    @staticmethod
    def _fetch(source: str, is_url: bool, incoming: Path, expected: str | None, name: str, policy,
               progress: Progress | None) -> str:
        """Copy or download ``source`` to ``incoming``; return the SHA-256 of what is there."""
        from engine.downloader import DownloadPolicy, download_file, sha256_file

        if is_url:
            download_file(source, incoming, sha256=expected, name=name, progress=progress,
                          policy=policy or DownloadPolicy())
        else:
            path = Path(source).expanduser()
            if not path.is_file():
                raise InvalidInputError(f"No model file at {source}; give the path of a {'/'.join(SUFFIXES)} file.")
            shutil.copyfile(path, incoming)
        return sha256_file(incoming)  # of the copy, which is what will be loaded

    def _publish(self, incoming: Path, model: UserModel, suffix: str) -> UserModel:
        """Rename the checked file into place and add its entry, under the catalog's lock."""
        filename = f"{MODELS_DIR}/{model.name}-{model.sha256[:8]}{suffix}"
        model = dataclasses.replace(model, filename=filename)
        with self._lock():
            models = self._read()
            self._check_free(model.name, models)
            with open(incoming, "rb") as file:
                os.fsync(file.fileno())
            os.replace(incoming, self.weights_dir / filename)
            fsync_dir(self.models_dir)
            self._write(models | {model.name: model})
        logger.info("Imported %s: %s x%d, sha256 %s", model.name, model.architecture, model.scale, model.sha256)
        return model


def user_catalog_for(weights_dir: str | os.PathLike) -> UserCatalog:
    """The user catalog of ``weights_dir`` (one object per folder in a process, so its read cache is shared)."""
    key = Path(weights_dir).resolve()
    with _CATALOGS_GUARD:
        return _CATALOGS.setdefault(key, UserCatalog(key))


_CATALOGS: dict[Path, UserCatalog] = {}
_CATALOGS_GUARD = threading.Lock()


# ------------------------------------------------------------------------------------------------ inspection
def _inspect(path: Path, *, name: str, kind: str, sha256: str, license: str, source: str) -> UserModel:
    """Load ``path`` safely, detect its network, measure it; refuse what cannot run (InvalidInputError)."""
    from engine.models import loader

    try:
        state = loader.read_state_dict(path)
        detected = loader.detect_network(state)
    except ModelNotAvailableError as exc:
        raise InvalidInputError(f"{name} was not imported. {exc}") from exc
    built = detected.built
    if detected.purpose == _FACE_PURPOSE:
        return _inspect_face(path, detected, name=name, kind=kind, sha256=sha256, license=license, source=source)
    if kind == "face":
        raise InvalidInputError(f"{name} was not imported as a face model: it is a {built.architecture} network for "
                                f"{detected.purpose}, not a face restoration network (GFPGAN, RestoreFormer). Import "
                                "it with another --kind (photo, anime, text or general).")
    if detected.purpose not in _PURPOSES:
        raise InvalidInputError(f"{name} was not imported: it is a {built.architecture} network for "
                                f"{detected.purpose}, not an image upscaler or restorer.")
    if detected.square:
        raise InvalidInputError(f"{name} was not imported: this {built.architecture} network takes square images "
                                "only, which the tiled engine cannot guarantee.")
    try:
        net = loader.rgb_network(built.module, built.input_channels, built.output_channels)
    except ModelNotAvailableError as exc:
        raise InvalidInputError(f"{name} was not imported. {exc}") from exc
    rule = built.architecture in _ARCH_OF  # the engine's own overlap rule for RRDBNet / Compact applies
    overlap, macs = measure_network(net, built.scale, max(detected.size_multiple, 1), minimum=detected.min_size,
                                    radius=not rule)
    return UserModel(
        name=name, architecture=built.architecture, scale=built.scale, kind=kind, sha256=sha256,
        size_bytes=path.stat().st_size, filename="", input_channels=built.input_channels,
        output_channels=built.output_channels, size_multiple=detected.size_multiple, min_size=detected.min_size,
        supports_half=built.supports_half, supports_bfloat16=built.supports_bfloat16, overlap=overlap,
        macs_per_pixel=macs, license=license.strip(), source=source,
        added=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), tags=detected.tags)


def _inspect_face(path: Path, detected, *, name: str, kind: str, sha256: str, license: str,
                  source: str) -> UserModel:
    """A face-restoration network: one the face enhancer runs, checked on one 512×512 face and measured."""
    built = detected.built
    if built.architecture not in _FACE_ARCHITECTURES:
        raise InvalidInputError(f"{name} was not imported: it is a {built.architecture} face network, and the face "
                                f"enhancer runs {' and '.join(_FACE_ARCHITECTURES)} networks only.")
    if kind not in ("face", "general"):
        raise InvalidSettingsError(f"{name} is a face restoration network ({built.architecture}), not a {kind} "
                                   "upscaler: import it with --kind face (or without --kind).")
    return UserModel(
        name=name, architecture=built.architecture, scale=1, kind="face", sha256=sha256,
        size_bytes=path.stat().st_size, filename="", min_size=detected.min_size,
        supports_half=built.supports_half, supports_bfloat16=built.supports_bfloat16,
        macs_per_pixel=measure_face_network(built.module, _ARCH_OF.get(built.architecture, built.architecture)),
        license=license.strip(), source=source,
        added=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), tags=detected.tags)


def measure_face_network(net, arch: str) -> int:
    """Multiply-accumulates per input pixel of a face network on one aligned 512×512 face, run the way the face
    enhancer runs it (:func:`engine.models.loader.face_forward`).

    Raises:
        InvalidInputError: the network fails on a face or does not give one back at 512×512.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from engine.models.loader import FACE_SIZE, face_forward

    face = torch.rand(1, 3, FACE_SIZE, FACE_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    counter = FlopCounterMode(display=False)
    try:
        with torch.inference_mode(), counter:
            out = face_forward(net, arch, face)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        raise InvalidInputError(f"The face network fails on a {FACE_SIZE}×{FACE_SIZE} face "
                                f"({str(exc).splitlines()[0][:200]}); it cannot be used.") from exc
    if tuple(out.shape) != (1, 3, FACE_SIZE, FACE_SIZE):
        raise InvalidInputError(f"The face network gives {tuple(out.shape)} for a {FACE_SIZE}×{FACE_SIZE} face, not "
                                "an RGB face of the same size; it cannot be used.")
    return int(counter.get_total_flops() // 2 // (FACE_SIZE * FACE_SIZE))


def measure_network(net, scale: int, multiple: int = 1, *, minimum: int = 1, radius: bool = True
                    ) -> tuple[int | None, int]:
    """Cost and receptive radius of an RGB super-resolution network, measured once on a small input.

    The cost is counted by torch's FLOP counter on one forward call. The radius is how far, in input pixels, a
    change of the centre pixel moves the output by more than 1/1000 of the largest change: the context a tile
    needs from its neighbours (at most 64; 64 when the change reaches the input's border). It costs a second
    forward call on a 32×32 input, so it is only measured when asked (architectures without a rule of their own).

    Args:
        net: Nx3xHxW float32 in [0, 1] → Nx3x(H*scale)x(W*scale).
        scale: the network's scale.
        multiple: input sides must be multiples of this.
        minimum: the smallest input side the network takes.
        radius: measure the receptive radius too.

    Returns:
        (radius in input pixels or None, multiply-accumulates per input pixel).

    Raises:
        InvalidInputError: the network fails on the input or gives the wrong size.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    side = -(-max(_PROBE_SIDE if radius else _PROBE_SIDE // 2, minimum) // multiple) * multiple
    image = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    out = _probe(net, image, counter)
    if tuple(out.shape) != (1, 3, side * scale, side * scale):
        raise InvalidInputError(f"The network gives {tuple(out.shape)} for a {side}×{side} image, not ×{scale} RGB; "
                                "it cannot be used.")
    macs = int(counter.get_total_flops() // 2 // (side * side))
    if not radius:
        return None, macs
    centre = side // 2
    changed = image.clone()
    changed[:, :, centre, centre] = 1.0 - changed[:, :, centre, centre]
    diff = (_probe(net, changed) - out).abs().amax(dim=(0, 1))
    largest = float(diff.max())
    moved = torch.nonzero(diff > 1e-3 * largest) if largest > 0 else torch.zeros(0, 2)
    reach = int(((moved.float() + 0.5) / scale - (centre + 0.5)).abs().max().ceil()) if len(moved) else 0
    return (_MAX_OVERLAP if reach >= centre - 1 else min(max(reach, 4), _MAX_OVERLAP)), macs


def _probe(net, image, counter=None):
    import contextlib

    import torch

    try:
        with torch.inference_mode(), counter or contextlib.nullcontext():
            return net(image)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        side = image.shape[-1]
        raise InvalidInputError(f"The network fails on a {side}×{side} image ({str(exc).splitlines()[0][:200]}); "
                                "it cannot be used.") from exc


