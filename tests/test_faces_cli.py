"""`enhance --face-enhance` from the command line: honest face counts without and with GFPGAN weights.

The GFPGAN weights here are the real GFPGANv1.4 architecture with random weights the test creates (the official
file can't be downloaded offline), loaded through the real model manager with checksum verification off.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PHOTO = Path(__file__).resolve().parent / "data" / "faces" / "blake_lively_245.png"


def _enhance(tmp_path: Path, weights_dir: Path, out: Path, *extra: str, **env_extra) -> dict:
    from tests.test_model_manager import _clean_env

    env = _clean_env(tmp_path) | {"REALESRGAN_WEIGHTS_DIR": str(weights_dir)} | env_extra
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "enhance", str(PHOTO), "--face-enhance", "-o",
                           str(out), "--model", "realesr-animevideov3", "--scale", "2", "--json", *extra],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def weights_dir(tmp_path, model_manager_session) -> Path:
    """A weights dir with the offline anime-video weights and nothing else."""
    path, _ = model_manager_session.weights_path("realesr-animevideov3")
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / path.name).symlink_to(path)
    return folder


def test_without_gfpgan_weights_faces_are_counted_and_the_warning_says_how(tmp_path, weights_dir):
    out = tmp_path / "out.png"
    record = _enhance(tmp_path, weights_dir, out)
    assert out.is_file() and record["ok"] is True
    assert record["faces_detected"] >= 1 and record["faces_restored"] == 0
    assert record["detector"] == "lbp-cascade"
    assert any("GFPGANv1.4" in w and "download" in w for w in record["warnings"]), record["warnings"]


def test_with_gfpgan_weights_every_detected_face_is_restored(tmp_path, weights_dir):
    from engine.catalog import CATALOG
    from engine.models.loader import reference_network

    torch.manual_seed(0)
    net = reference_network(CATALOG["GFPGANv1.4"].arch, CATALOG["GFPGANv1.4"].arch_params)
    torch.save({"params_ema": net.state_dict()}, weights_dir / CATALOG["GFPGANv1.4"].filename)
    out = tmp_path / "restored.png"
    record = _enhance(tmp_path, weights_dir, out, "--save-face-crops", REALESRGAN_VERIFY_CHECKSUMS="false")
    assert out.is_file()
    assert record["faces_detected"] >= 1
    assert record["faces_restored"] == record["faces_detected"], record["warnings"]
    crops = sorted(tmp_path.glob("restored_face*.png"))
    assert len(crops) == record["faces_restored"]
    from PIL import Image

    assert all(Image.open(c).size == (512, 512) for c in crops)


def test_identity_and_lpips_metrics_when_their_weights_are_present(tmp_path, weights_dir):
    """GFPGAN, ArcFace IR-SE50 and the AlexNet trunk: real architectures, random weights the test makes (checksums
    off); the LPIPS linear layers are the real ones from the lpips package. The JSON then carries an identity
    similarity per restored face and an LPIPS value, and warns when the identity is low."""
    import torchvision

    from engine.catalog import CATALOG
    from engine.models.loader import reference_network
    from utils.compat import install_torchvision_shim

    install_torchvision_shim()
    from facexlib.recognition.arcface_arch import Backbone

    torch.manual_seed(0)
    gfpgan = CATALOG["GFPGANv1.4"]
    torch.save({"params_ema": reference_network(gfpgan.arch, gfpgan.arch_params).state_dict()},
               weights_dir / gfpgan.filename)
    torch.save(Backbone(num_layers=50, drop_ratio=0.6, mode="ir_se").state_dict(),
               weights_dir / CATALOG["arcface-ir-se50"].filename)
    torch.save(torchvision.models.alexnet().state_dict(), weights_dir / CATALOG["lpips-alexnet"].filename)
    record = _enhance(tmp_path, weights_dir, tmp_path / "out.png", REALESRGAN_VERIFY_CHECKSUMS="false")
    metrics = record["metrics"]
    assert record["faces_restored"] >= 1
    assert len(metrics["identity_similarity_per_face"]) == record["faces_restored"]
    assert -1.0 <= metrics["identity_similarity"] <= 1.0
    low = any("identity similarity" in w and "below" in w for w in metrics["warnings"])
    assert low == (metrics["identity_similarity"] < 0.6)
    assert low == any("identity similarity" in w and "below" in w for w in record["warnings"])  # told to the user
    assert isinstance(metrics["lpips"], float) and metrics["lpips"] != 0.0
    assert not any("not computed" in w and ("LPIPS" in w or "identity" in w) for w in metrics["warnings"])
