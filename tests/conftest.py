"""Shared fixtures. Tests never touch the network or the user's real directories."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"

# A per-session cache for the converted offline weights, so each test does not convert them again.
_SESSION_WEIGHTS: Path | None = None


@contextlib.contextmanager
def serve_folder(folder: Path):
    """A loopback HTTP server for the files in ``folder``; yields its base URL (no trailing slash)."""
    import http.server
    import threading

    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(folder), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_config(root: Path, weights_dir: Path, **changes):
    """A Config for an app under test: everything under ``root``, shared weights, no downloads, a free port."""
    from config import Config

    return Config.from_env(env={}, dotenv_path=None, weights_dir=weights_dir, output_dir=root / "out",
                           temp_dir=root / "tmp", config_dir=root / "cfg", log_dir=root / "logs", download_retries=0,
                           host="127.0.0.1", port=free_port(), **changes)


@contextlib.contextmanager
def serve_app(root: Path, weights_dir: Path, **changes):
    """Run the whole app (UI and REST API) on a free local port; yields (url, services), then stops it.

    ``changes`` are Config fields that differ from :func:`app_config`'s (an API key, a rate limit...)."""
    from ui.app import start
    from ui.services import create_services

    saved_env = os.environ.get("GRADIO_TEMP_DIR")  # start() points Gradio's uploads into the app's temp dir
    services = create_services(app_config(root, weights_dir, **changes))
    demo, _app, url = start(services, prevent_thread_lock=True)
    try:
        yield url, services
    finally:
        demo.close()
        if saved_env is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = saved_env


@pytest.fixture(autouse=True)
def _isolate_env(monkeypatch, tmp_path):
    """Keep every test away from the user's config, and from any REALESRGAN_* variables of the shell."""
    for key in list(os.environ):
        if key.startswith("REALESRGAN_"):
            monkeypatch.delenv(key)
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def native_bf16(monkeypatch):
    """bf16 as a CPU with bf16 instructions (AVX512-BF16 or AMX) runs it, whatever this host has: for tests of what
    the engine does with bf16 (elsewhere it runs emulated: slower, the same values)."""
    from utils import gpu

    monkeypatch.setattr(gpu, "cpu_has_fast_bf16", lambda: True)


@pytest.fixture
def config(tmp_path, shared_weights_dir):
    from config import Config

    return Config.from_env(env={}, dotenv_path=None, weights_dir=shared_weights_dir, output_dir=tmp_path / "out",
                           temp_dir=tmp_path / "tmp", config_dir=tmp_path / "cfg", log_dir=tmp_path / "logs",
                           download_retries=0)


@pytest.fixture(scope="session")
def shared_weights_dir(tmp_path_factory) -> Path:
    """A weights dir shared by the session, holding the bundled offline weights once converted."""
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(scope="session")
def model_manager_session(shared_weights_dir):
    from config import Config
    from engine.model_manager import ModelManager

    cfg = Config.from_env(env={}, dotenv_path=None, weights_dir=shared_weights_dir, download_retries=0)
    return ModelManager(cfg)


@pytest.fixture
def model_manager(config):
    from engine.model_manager import ModelManager

    return ModelManager(config)


def unverified_manager(weights_dir: Path, **config_changes):
    """A model manager over ``weights_dir`` whose catalog pins no hash or size, so the weights a test writes there
    under a model's catalog file name (random weights of the real architectures) are used as they are."""
    import dataclasses

    from config import Config
    from engine.catalog import CATALOG
    from engine.model_manager import ModelManager

    catalog = {name: dataclasses.replace(spec, sha256=None, size_bytes=None) for name, spec in CATALOG.items()}
    config = Config.from_env(env={}, dotenv_path=None, weights_dir=weights_dir, download_retries=0,
                             **config_changes)
    return ModelManager(config, catalog)


@pytest.fixture(scope="session")
def helper_weights_dir(tmp_path_factory) -> Path:
    """Random weights of the real RetinaFace-ResNet50 (saved with DataParallel's ``module.`` prefix) and ParseNet
    under their catalog file names: the official files can't be downloaded here."""
    import torch

    from engine.catalog import CATALOG
    from engine.models.loader import reference_network

    folder = tmp_path_factory.mktemp("helper-weights")
    torch.manual_seed(0)
    for name, prefix in (("detection_Resnet50_Final", "module."), ("parsing_parsenet", "")):
        spec = CATALOG[name]
        state = reference_network(spec.arch, spec.arch_params).state_dict()
        torch.save({prefix + key: value for key, value in state.items()}, folder / spec.filename)
    return folder
