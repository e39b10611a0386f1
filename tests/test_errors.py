"""The one error table (utils.errors): every domain exception has a row found along its MRO, the user message
hides server paths and unexpected details, and the CLI, the web UI and the REST API tell the user the same thing
for the same failure (run through the real CLI process, the real UI handler and the real FastAPI server)."""

from __future__ import annotations

import importlib
import json
import pkgutil
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from utils import errors
from utils.errors import (ERROR_TABLE, EXIT_CANCELLED, EXIT_FAILED, EXIT_USAGE, UNEXPECTED, EngineError, ErrorKind,
                          Stage, error_kind, is_expected, user_message)

ROOT = Path(__file__).resolve().parent.parent


def _domain_classes() -> set[type[EngineError]]:
    """Every EngineError subclass the app defines, after importing every module of engine/ and ui/."""
    import engine
    import ui

    for package in (engine, ui):
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{module.name}")
    found, stack = {EngineError}, [EngineError]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub.__module__.split(".")[0] in ("engine", "ui", "utils") and sub not in found:
                found.add(sub)
                stack.append(sub)
    return found


# ------------------------------------------------------------------------------------------------ the table
def test_domain_exceptions_are_defined_once_in_utils_errors_and_reexported_by_the_engine():
    import engine.concurrency
    import engine.errors
    import engine.settings_manager

    classes = _domain_classes()
    assert {cls.__module__ for cls in classes} == {"utils.errors"}, sorted(c.__qualname__ for c in classes)
    for name in engine.errors.__all__:
        assert getattr(engine.errors, name) is getattr(errors, name)
    assert engine.concurrency.QueueFullError is errors.QueueFullError
    assert engine.settings_manager.PresetNotFoundError is errors.PresetNotFoundError


def test_every_domain_exception_maps_to_a_complete_row():
    stages = set(typing.get_args(Stage))
    for cls in _domain_classes():
        kind = error_kind(cls)
        assert kind is not UNEXPECTED, cls
        assert 400 <= kind.status <= 599 and kind.stage in stages and kind.title, (cls, kind)
        assert kind.exit_code in (EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED), (cls, kind)
        assert kind.message is None, f"{cls.__name__}: a domain error's own text is what the user reads"
    for cls, kind in ERROR_TABLE.items():
        assert isinstance(kind, ErrorKind) and (issubclass(cls, EngineError) or cls in (MemoryError, RecursionError)), cls


@pytest.mark.parametrize("exc, status, stage, title, exit_code", [
    (errors.UnsupportedFormatError("x"), 415, "validation", "Unsupported file", EXIT_FAILED),
    (errors.InputTooLargeError("x"), 413, "validation", "Input too large", EXIT_FAILED),
    (errors.InvalidSettingsError("x"), 422, "validation", "Check the settings", EXIT_USAGE),
    (errors.BuiltinPresetError("x"), 422, "validation", "Check the settings", EXIT_USAGE),
    (errors.InvalidInputError("x"), 422, "decode", "Can't read this file", EXIT_FAILED),
    (errors.NoFaceFoundError("x"), 422, "faces", "No face found", EXIT_FAILED),
    (errors.ModelNotAvailableError("x"), 503, "model", "Model not available", EXIT_FAILED),
    (errors.DownloadError("x"), 503, "model", "Download failed", EXIT_FAILED),
    (errors.ChecksumMismatchError("m", "a" * 64, "b" * 64), 503, "model", "Damaged model file", EXIT_FAILED),
    (errors.UnsafeEnvironmentError("x"), 503, "model", "Unsafe environment", EXIT_FAILED),
    (errors.OutOfMemoryError("x"), 503, "inference", "Out of memory", EXIT_FAILED),
    (errors.FaceEnhancementError("x"), 500, "faces", "Face enhancement", EXIT_FAILED),
    (errors.VideoError("x"), 500, "decode", "Video problem", EXIT_FAILED),
    (errors.CancelledError("x"), 500, "inference", "Cancelled", EXIT_CANCELLED),
    (errors.QueueFullError("x", retry_after=3), 429, "inference", "Server busy", EXIT_FAILED),
    (errors.PresetNotFoundError("p", []), 404, "validation", "Preset not found", EXIT_USAGE),
    (errors.SettingsStorageError("x"), 500, "settings", "Settings not saved", EXIT_FAILED),
    (errors.EngineError("x"), 500, "inference", "Something went wrong", EXIT_FAILED),
    (MemoryError(), 503, "inference", "Out of memory", EXIT_FAILED),
])
def test_rows(exc, status, stage, title, exit_code):
    kind = error_kind(exc)
    assert (kind.status, kind.stage, kind.title, kind.exit_code) == (status, stage, title, exit_code)
    assert is_expected(exc)


def test_the_most_specific_row_wins_whatever_the_table_order():
    """A class with a row of its own gets that row, never one of its ancestors' (however the table is ordered)."""
    derived = [cls for cls in ERROR_TABLE if any(p in ERROR_TABLE for p in cls.__mro__[1:])]
    assert len(derived) >= 10  # e.g. ChecksumMismatchError < DownloadError < ModelNotAvailableError < EngineError
    for cls in derived:
        assert error_kind(cls) is ERROR_TABLE[cls], cls


def test_a_subclass_defined_later_finds_its_parents_row():
    class TileTooLargeError(errors.InputTooLargeError):
        pass

    class BusyAgainError(errors.QueueFullError, RuntimeError):
        pass

    class DiskPresetError(errors.SettingsStorageError, OSError):
        pass

    class BothError(errors.UnsupportedFormatError, errors.InvalidSettingsError):  # MRO: the first base wins
        pass

    assert error_kind(TileTooLargeError("x")) is ERROR_TABLE[errors.InputTooLargeError]
    assert error_kind(BusyAgainError("x", retry_after=1)) is ERROR_TABLE[errors.QueueFullError]
    assert error_kind(DiskPresetError("x")) is ERROR_TABLE[errors.SettingsStorageError]
    assert error_kind(BothError("x")) is ERROR_TABLE[errors.UnsupportedFormatError]
    for cls in list(ERROR_TABLE):
        later = type(f"Later{cls.__name__}", (cls,), {})
        assert error_kind(later) is ERROR_TABLE[cls], cls


# ------------------------------------------------------------------------------------------------ messages
def test_domain_messages_are_the_engines_own_text_without_server_paths():
    message = user_message(errors.InvalidInputError("Cannot decode /home/me/secret/x.png; see C:\\Users\\me\\y.png."))
    assert message == "Cannot decode x.png; see y.png."
    kept = user_message(errors.DownloadError("Get it from https://github.com/a/b.pth and put it in /srv/w/."))
    assert "https://github.com/a/b.pth" in kept and "/srv" not in kept
    assert user_message(errors.CancelledError()) == "Cancelled."  # no text of its own: the row's title


@pytest.mark.parametrize("exc", [KeyError("/srv/app/internal.json"), ValueError("bad shape (3, 4) in /srv/x.py"),
                                 RuntimeError("boom at /srv/secret/engine.py"), ZeroDivisionError("division"),
                                 AttributeError("'NoneType' object has no attribute 'shape'")])
def test_unexpected_errors_get_one_generic_line_naming_no_class(exc):
    assert error_kind(exc) is UNEXPECTED and not is_expected(exc)
    message = user_message(exc)
    assert message == UNEXPECTED.message
    assert type(exc).__name__ not in message and "Error" not in message and "/srv" not in message
    assert str(exc) not in message and "log" in message


def test_out_of_memory_from_torch_is_the_memory_row():
    import torch

    assert error_kind(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) is ERROR_TABLE[MemoryError]
    if hasattr(torch, "OutOfMemoryError"):
        assert error_kind(torch.OutOfMemoryError("CUDA error")) is ERROR_TABLE[MemoryError]
    message = user_message(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; /srv/x)"))
    assert message == ERROR_TABLE[MemoryError].message and "GiB" not in message


def test_checksum_mismatch_of_a_converted_file_sets_it_aside_and_converts_again(tmp_path, model_manager_session):
    """The converted offline weights are damaged: the file is set aside as ``*.corrupt-<time>`` (not used, not
    deleted) and converted again from the installed package, so this run and every later one work (issue 16)."""
    import torch

    from config import Config
    from engine.model_manager import ModelManager
    from engine.ncnn_convert import state_dict_sha256
    from tests.test_rest_api import FAST_MODEL, _closed_port, _offline_catalog

    config = Config.from_env(env={}, dotenv_path=None, weights_dir=tmp_path / "w", download_retries=0)
    manager = ModelManager(config, catalog=_offline_catalog(_closed_port()))
    spec = manager.spec(FAST_MODEL)
    damaged = manager.bundled_path(spec)
    damaged.parent.mkdir(parents=True)
    shutil.copyfile(model_manager_session.import_bundled(FAST_MODEL), damaged)
    payload = torch.load(damaged, weights_only=True)
    first = next(iter(payload["params_ema"]))
    payload["params_ema"][first] = payload["params_ema"][first] + 1.0
    torch.save(payload, damaged)

    state, source = manager.load_state_dict(FAST_MODEL, allow_download=False)

    assert source == "bundled" and state_dict_sha256(state) == spec.bundled.state_dict_sha256
    assert len(list(damaged.parent.glob(damaged.name + ".corrupt-*"))) == 1 and damaged.is_file()
    again, _ = ModelManager(config, catalog=_offline_catalog(_closed_port())).load_state_dict(FAST_MODEL,
                                                                                              allow_download=False)
    assert state_dict_sha256(again) == spec.bundled.state_dict_sha256


# ------------------------------------------------------------------------------------ one message on every surface
def _gif() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="GIF")
    return buffer.getvalue()


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    from tests.test_model_manager import _clean_env

    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], capture_output=True, text=True,
                          timeout=600, env=_clean_env(tmp_path), cwd=tmp_path)


def test_cli_ui_and_rest_say_the_same_thing_for_the_same_failure(tmp_path, config):
    import gradio as gr
    import httpx

    from engine.model_manager import ModelManager
    from tests.test_rest_api import (FAST_MODEL, _closed_port, _files, _offline_catalog, _png, _png_header_only,
                                     _services, serve)
    from ui.errors import friendly_errors
    from ui.tab_image import enhance_file

    cases = {"anim.png": _gif(), "cut.png": _png()[:60], "bomb.png": _png_header_only(50000, 50000)}
    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in cases.items():
        (folder / name).write_bytes(data)

    cli = _cli(tmp_path, "enhance", *(str(folder / n) for n in cases), "-o", str(tmp_path / "cli-out"),
               "--model", FAST_MODEL, "--json")
    assert cli.returncode == EXIT_FAILED, cli.stderr[-3000:]
    cli_says = {Path(r["input"]).name: r for r in map(json.loads, cli.stdout.strip().splitlines())}
    assert not any(r["ok"] for r in cli_says.values())
    raised_types = {}

    services = _services(config, ModelManager(config, catalog=_offline_catalog(_closed_port())))
    with serve(services) as url, httpx.Client(base_url=url, timeout=60) as client:
        for name, data in cases.items():
            path = folder / name
            with pytest.raises(EngineError) as raised:  # what the UI handler gets from the engine...
                enhance_file(services, path, {"model": FAST_MODEL})
            with pytest.raises(gr.Error) as shown:  # ...and what the user sees in the toast
                with friendly_errors("Enhance"):
                    enhance_file(services, path, {"model": FAST_MODEL})
            response = client.post("/api/v1/enhance", files=_files(data, name), data={"model": FAST_MODEL})

            kind = error_kind(raised.value)
            assert kind is not UNEXPECTED
            expected = user_message(raised.value)
            assert str(tmp_path) not in expected and "Error" not in expected
            assert shown.value.message == expected and shown.value.title == kind.title, name
            assert cli_says[name]["error"] == expected, name
            assert (response.status_code, response.json()) == (kind.status, {"error": expected, "stage": kind.stage})
            raised_types[name] = type(raised.value)
    assert raised_types == {"anim.png": errors.UnsupportedFormatError, "cut.png": errors.InvalidInputError,
                            "bomb.png": errors.InputTooLargeError}


def test_cli_exit_code_and_message_come_from_the_table(tmp_path):
    from PIL import Image

    from utils.gpu import resolve_device

    Image.new("RGB", (16, 16)).save(tmp_path / "ok.png")
    (tmp_path / "anim.png").write_bytes(_gif())
    with pytest.raises(errors.InvalidSettingsError) as bad_device:
        resolve_device("cuda:99")
    done = _cli(tmp_path, "analyze", str(tmp_path / "ok.png"), "--device", "cuda:99")
    assert done.returncode == error_kind(bad_device.value).exit_code == EXIT_USAGE
    assert done.stderr.strip().splitlines()[-1] == f"Error: {user_message(bad_device.value)}"
    refused = _cli(tmp_path, "analyze", str(tmp_path / "anim.png"))
    assert refused.returncode == ERROR_TABLE[errors.UnsupportedFormatError].exit_code == EXIT_FAILED
    assert refused.stderr.strip().splitlines()[-1].startswith("Error: GIF files are not supported")
    assert "Traceback" not in refused.stderr and "UnsupportedFormatError" not in refused.stderr
