"""The scene network (engine/scene_net.py): nsfwjs' MobileNetV2 converted by bench/scene_backbone.py and run in numpy.

The shipped weights are checked against the package's own output: nsfwjs 4.4.0's model run by TensorFlow.js
(@tensorflow/tfjs 4, CPU backend, in node) on a fixed input gave the five class probabilities pinned below. The
conversion code is run on a package-shaped tarball served from a loopback server.
"""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from bench import scene_backbone
from bench.fit_content_type import read_rgb
from engine import scene_net
from engine.image_analysis import (MEASURES_WEIGHT, SCENE_MIN_SIDE, _prepare, analyze, content_features,
                                   content_logit, pixels_logit, scene_logit)
from tests.conftest import serve_folder

DATA = Path(__file__).parent / "data" / "advisor"

# nsfwjs' MobileNetV2 in TensorFlow.js on x[i] = ((i * 2654435761) % 1000) / 1000 over its 1x224x224x3 input:
# Drawing, Hentai, Neutral, Porn, Sexy.
TFJS_PROBABILITIES = [0.5974652171134949, 0.030504746362566948, 0.3554413616657257, 0.012371562421321869,
                      0.0042171659879386425]


def _tfjs_input() -> np.ndarray:
    i = np.arange(224 * 224 * 3, dtype=np.int64)
    return ((i * 2654435761) % 1000 / 1000).astype(np.float32).reshape(224, 224, 3)


def _dense(stored, name: str) -> tuple[np.ndarray, np.ndarray]:
    def value(key: str) -> np.ndarray:
        return stored[key].astype(np.float64) * float(stored[key + ":scale"]) + float(stored[key + ":min"])
    return value(f"{name}:kernel"), value(f"{name}:bias")


def test_the_converted_network_gives_what_nsfwjs_gives_in_tensorflow_js():
    features = scene_net.scene_features(_tfjs_input() * 255.0)
    assert features.shape == (1280,)
    with np.load(scene_net.BACKBONE_PATH) as stored:
        x = features.astype(np.float64)
        for name in ("dense_1", "dense_2"):
            kernel, bias = _dense(stored, name)
            x = np.maximum(x @ kernel + bias, 0.0)
        kernel, bias = _dense(stored, "dense_3")
    logits = x @ kernel + bias
    probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(probabilities, TFJS_PROBABILITIES, atol=1e-4)


def test_the_input_is_the_whole_image_squeezed_with_transparency_on_white():
    rgb = np.zeros((90, 300, 3), np.float32)
    alpha = np.zeros((90, 300), np.float32)
    alpha[:, :150] = 1.0
    x = scene_net.network_input(rgb, alpha)
    assert x.shape == (224, 224, 3) and x.dtype == np.float32
    assert x[:, :100].max() == 0.0 and x[:, 124:].min() == pytest.approx(1.0)  # opaque black | transparent -> white
    assert scene_net.network_input(np.full((40, 60, 3), 255, np.uint8)).min() == pytest.approx(1.0)  # enlarged


def test_the_advisor_adds_the_scene_head_to_the_measures():
    image = read_rgb(DATA / "0014.jpg")
    prep = _prepare(image)
    expected = MEASURES_WEIGHT * content_logit(content_features(image)) + scene_logit(prep.content_rgb,
                                                                                       prep.content_alpha)
    assert pixels_logit(image) == pytest.approx(expected, abs=1e-9)
    assert analyze(image, detect_faces_too=False).content_logit == pytest.approx(expected, abs=1e-9)
    # The shipped head reads a Real-ESRGAN anime frame as a drawing and a landscape photo as a photo.
    assert scene_logit(prep.content_rgb) > 0
    photo = _prepare(read_rgb(DATA / "OST_009.png"))
    assert scene_logit(photo.content_rgb) < 0


def test_an_image_under_the_scene_networks_minimum_gets_the_measures_alone():
    small = read_rgb(DATA / "comic_lq.png")  # 60x90: the network would see it blown up 2.5x
    assert max(small.shape[:2]) < SCENE_MIN_SIDE
    assert pixels_logit(small) == pytest.approx(content_logit(content_features(small)), abs=1e-9)
    assert analyze(small, detect_faces_too=False).content_type == "anime"


# ------------------------------------------------------------------------------------------------ the converter
def _package(weights: bytes, entries: str) -> bytes:
    """A tarball laid out as nsfwjs': the manifest in a JS module, the weights as one base64 string in another."""
    files = {scene_backbone.MODEL: f'a.exports={{modelTopology:{{}},weightsManifest:[{{paths:["group1-shard1of1"],'
                                   f'weights:[{entries}]}}]}}',
             scene_backbone.SHARD: f'a.exports="{base64.b64encode(weights).decode()}"}},{{}}]',
             scene_backbone.LICENSE: "MIT License (test)"}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _entry(name: str, shape: tuple[int, ...], low: float, scale: float) -> str:
    return (f'{{name:"{name}",shape:[{",".join(map(str, shape))}],dtype:"float32",'
            f'quantization:{{min:{low},scale:{scale},dtype:"uint8"}}}}')


def test_the_converter_downloads_checks_and_keeps_every_tensor_as_shipped(tmp_path):
    rng = np.random.default_rng(0)
    weights = rng.integers(0, 256, 8000, dtype=np.uint8).tobytes()
    entries = ",".join((_entry("Conv1/kernel", (3, 3, 3, 32), -0.5, 0.004),
                        _entry("dense_3/bias", (5,), 0.25, 0.01), _entry("rest/gamma", (8000 - 864 - 5,), 1e-3, 2e-5)))
    tarball = _package(weights, entries)
    (tmp_path / "nsfwjs.tgz").write_bytes(tarball)
    with serve_folder(tmp_path) as base:
        url = f"{base}/nsfwjs.tgz"
        with pytest.raises(ValueError, match="expected"):
            scene_backbone.fetch(url, sha256="0" * 64)
        fetched = scene_backbone.fetch(url, sha256=hashlib.sha256(tarball).hexdigest())
    arrays, licence = scene_backbone.convert(fetched)
    assert licence == "MIT License (test)"
    kernel = arrays["Conv1:kernel"]
    assert kernel.shape == (3, 3, 3, 32) and kernel.dtype == np.uint8
    assert kernel.tobytes() == weights[:864] and arrays["dense_3:bias"].tobytes() == weights[864:869]
    assert float(arrays["Conv1:kernel:min"]) == pytest.approx(-0.5)
    assert float(arrays["rest:gamma:scale"]) == pytest.approx(2e-5)


def test_the_converter_refuses_a_manifest_that_does_not_cover_the_weights():
    weights = bytes(8000)
    tarball = _package(weights, _entry("Conv1/kernel", (3, 3, 3, 32), -0.5, 0.004))
    with pytest.raises(ValueError, match="covers 864 bytes"):
        scene_backbone.convert(tarball)
