"""Layering and the basicsr compatibility shim, checked in fresh interpreters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_reference_packages_import_with_the_shim():
    done = _run("from utils.compat import install_torchvision_shim; install_torchvision_shim();"
                "import basicsr, realesrgan, gfpgan, facexlib; print('ok')")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


def test_engine_does_not_import_gradio_and_has_no_import_side_effects(tmp_path):
    code = (
        "import sys, os; os.chdir(sys.argv[1]);"
        "import engine, engine.model_manager, engine.upscaler, engine.catalog, engine.downloader;"
        "import utils.gpu, utils.logger, config;"
        "assert 'gradio' not in sys.modules, 'engine imported gradio';"
        "print(sorted(os.listdir('.')))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                            "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"  # nothing created in the working directory
    assert not any(tmp_path.iterdir())  # nor in HOME (cache/config dirs)


def test_utils_import_neither_engine_nor_ui():
    for path in (ROOT / "utils").glob("*.py"):
        text = path.read_text()
        assert "from engine" not in text and "import engine" not in text, path
        assert "from ui" not in text and "import ui" not in text, path


def test_public_engine_api_resolves_lazily():
    done = _run("import sys, engine; assert 'engine.processor' not in sys.modules;"
                "missing = [n for n in engine.__all__ if getattr(engine, n, None) is None];"
                "assert not missing, missing; assert 'gradio' not in sys.modules; print('ok')")
    assert done.returncode == 0, done.stderr[-2000:]
