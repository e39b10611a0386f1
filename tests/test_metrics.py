"""utils.metrics: file metrics, LR consistency, NIQE (basicsr's values, real parameters), LPIPS/identity reporting."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import DATA, ROOT, unverified_manager
from utils.metrics import (PSNR_CAP_DB, calculate_image_metrics, file_metrics, format_bytes, get_image_info,
                           lpips_distance, lr_consistency, niqe, quality_metrics)

PHOTO = DATA / "metrics" / "ADE_val_00000114.jpg"  # 256x256 natural photo (BSD 3-Clause, Real-ESRGAN inputs)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """The test photo, ``256x256x3`` uint8 RGB."""
    bgr = cv2.imread(str(PHOTO), cv2.IMREAD_COLOR)
    assert bgr is not None and bgr.shape == (256, 256, 3)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _nearest_2x(image: np.ndarray) -> np.ndarray:
    return cv2.resize(image, (image.shape[1] * 2, image.shape[0] * 2), interpolation=cv2.INTER_NEAREST)


def _dumps(obj: object) -> str:
    return json.dumps(obj, allow_nan=False)


# ------------------------------------------------------------------------------------------------- file metrics
def test_file_metrics_matches_the_design_formatting():
    m = file_metrics((1920, 1080), (3840, 2160), 467_149, 1_264_128)
    assert m["original_size"] == "1920x1080"
    assert m["enhanced_size"] == "3840x2160"
    assert m["scale_factor"] == "2.0x"
    assert m["original_filesize"] == "456.2 KB"
    assert m["enhanced_filesize"] == "1234.5 KB"
    assert m["size_change"] == "+170.6%"
    assert m["original_bytes"] == 467_149 and m["enhanced_bytes"] == 1_264_128
    assert m["scale_factor_value"] == 2.0 and m["scale_factor_y_value"] == 2.0
    assert m["size_change_percent"] == pytest.approx(170.61, abs=0.01)
    _dumps(m)


def test_file_metrics_size_change_sign_and_unknown_sizes():
    assert file_metrics((100, 100), (400, 400), 2000, 1000)["size_change"] == "-50.0%"
    assert file_metrics((100, 100), (400, 400), 1000, 1000)["size_change"] == "+0.0%"
    assert file_metrics((100, 100), (300, 300))["scale_factor"] == "3.0x"
    unknown = file_metrics((100, 100), (400, 400), None, 1000)
    assert unknown["original_filesize"] == "n/a" and unknown["size_change"] == "n/a"
    assert unknown["original_bytes"] is None and unknown["size_change_percent"] is None
    assert file_metrics((10, 10), (20, 20), 0, 10)["size_change"] == "n/a"  # no division by zero
    _dumps(unknown)


def test_file_metrics_rejects_bad_values():
    with pytest.raises(ValueError):
        file_metrics((0, 10), (20, 20))
    with pytest.raises(ValueError):
        file_metrics((10, 10), (20, 20), -1, 5)
    with pytest.raises(ValueError):
        format_bytes(-1)


def test_format_bytes_is_kilobytes_with_one_decimal():
    assert format_bytes(0) == "0.0 KB"
    assert format_bytes(1536) == "1.5 KB"
    assert format_bytes(10 * 1024 * 1024) == "10240.0 KB"


def test_get_image_info_takes_depth_from_dtype():
    gray16 = np.zeros((5, 7), np.uint16)  # all values < 256: still 16-bit
    assert get_image_info(gray16) == {"width": 7, "height": 5, "channels": 1, "mode": "L", "bit_depth": 16,
                                      "has_alpha": False}
    rgba = np.zeros((3, 4, 4), np.uint8)
    assert get_image_info(rgba)["mode"] == "RGBA" and get_image_info(rgba)["bit_depth"] == 8
    assert get_image_info(rgba)["has_alpha"] is True
    with pytest.raises(TypeError):
        get_image_info(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        get_image_info(np.zeros((4, 4, 5), np.uint8))


# ----------------------------------------------------------------------------------------------- LR consistency
def test_exact_nearest_upscale_is_lr_consistent_and_shifted_or_garbled_is_not(photo):
    exact = lr_consistency(photo, _nearest_2x(photo))
    assert exact["psnr"] > 40 and exact["psnr"] == PSNR_CAP_DB  # identical after INTER_AREA: capped, not inf
    assert exact["ssim"] == pytest.approx(1.0)

    shifted = lr_consistency(photo, np.roll(_nearest_2x(photo), 6, axis=1))
    assert shifted["psnr"] < 35 and shifted["ssim"] < 0.95

    rng = np.random.default_rng(0)
    garbled = _nearest_2x(photo).reshape(-1, 3)[rng.permutation(512 * 512)].reshape(512, 512, 3)
    result = lr_consistency(photo, garbled)
    assert result["psnr"] < 20 and result["ssim"] < 0.3


@pytest.mark.parametrize("shape", [(600, 257, 3), (523, 300, 1), (12, 40, 3), (300, 11, 3)])
def test_lr_consistency_in_bands_equals_whole_image_psnr_and_basicsr_ssim(shape):
    """LR consistency works METRIC_BAND_ROWS rows at a time (bounded memory); its PSNR and SSIM are the
    whole-image figures: the PSNR of the whole luminance and basicsr's SSIM of it (the reference it follows)."""
    from utils import metrics
    from utils.compat import install_torchvision_shim

    install_torchvision_shim()
    from basicsr.metrics.psnr_ssim import _ssim as basicsr_ssim

    rng = np.random.default_rng(11)
    base = cv2.GaussianBlur(rng.random(shape[:2]), (0, 0), 3)[:, :, None] * np.array([[[200, 150, 90]]])[..., :shape[2]]
    original = np.clip(base + rng.normal(0, 6, shape), 0, 255).astype(np.uint8)
    back = np.clip(original + rng.normal(0, 9, shape), 0, 255).astype(np.uint8)
    assert shape[0] > metrics.METRIC_BAND_ROWS or min(shape[:2]) < 20  # several bands, or the small edge cases
    got = metrics._lr_consistency_float(metrics._to_float255(original), metrics._to_float255(back))
    y_orig = metrics._luminance(metrics._to_float255(original)).astype(np.float64)
    y_back = metrics._luminance(metrics._to_float255(back)).astype(np.float64)
    assert got["psnr"] == pytest.approx(10 * np.log10(255 ** 2 / np.mean((y_orig - y_back) ** 2)), rel=1e-12)
    assert got["ssim"] == pytest.approx(basicsr_ssim(y_orig, y_back), rel=1e-9, abs=1e-12)


def test_lr_consistency_handles_uint16_by_dtype(photo):
    photo16 = photo.astype(np.uint16) * 257
    assert lr_consistency(photo16, _nearest_2x(photo16))["psnr"] == PSNR_CAP_DB
    # an 8-bit input and its 16-bit output compare on the same scale
    assert lr_consistency(photo, _nearest_2x(photo16))["psnr"] == PSNR_CAP_DB
    # uint16 holding 8-bit-sized values is a nearly black 16-bit image, not an 8-bit one
    dark = _nearest_2x(photo).astype(np.uint16)
    assert lr_consistency(photo, dark)["psnr"] < 15


def test_lr_consistency_gray_and_mixed_channels(photo):
    gray = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    assert gray.ndim == 2
    assert lr_consistency(gray, _nearest_2x(gray))["psnr"] == PSNR_CAP_DB
    assert lr_consistency(gray[:, :, None], _nearest_2x(gray))["psnr"] == PSNR_CAP_DB
    as_rgb = np.repeat(_nearest_2x(gray)[:, :, None], 3, axis=2)  # engine may return gray as RGB
    assert lr_consistency(gray, as_rgb)["psnr"] == PSNR_CAP_DB


def test_alpha_is_ignored(photo):
    rgba = np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])
    out = _nearest_2x(rgba)
    out[:, :, 3] = 0  # a different alpha does not change colour fidelity
    assert lr_consistency(rgba, out)["psnr"] == PSNR_CAP_DB


# ------------------------------------------------------------------------------------------------------- NIQE
def test_blurred_image_scores_worse_niqe(photo):
    sharp = niqe(photo)
    blurred = niqe(cv2.GaussianBlur(photo, (0, 0), 2.0))
    assert 2.0 < sharp < 8.0
    assert blurred > sharp + 2.0


@pytest.mark.parametrize("name", ["metrics/ADE_val_00000114.jpg", "advisor/children-alpha.png", "advisor/comic.png",
                                  "advisor/onepiece_105.jpg", "advisor/Blake_Lively.jpg", "advisor/wolf_gray.jpg",
                                  "advisor/0030.jpg", "upscaler/ost_009_crop192.png"])
def test_niqe_matches_basicsr_reference(name):
    """basicsr's own ``calculate_niqe`` (BGR input, Y channel) gives the same score on photos, drawings, gray, flat
    (transparent) regions and sizes that are not whole blocks; the block statistics are summed in double
    precision here, float32 there, hence the small tolerance (scores are shown to 2 decimals)."""
    from utils.compat import install_torchvision_shim

    install_torchvision_shim()
    from basicsr.metrics.niqe import calculate_niqe

    bgr = cv2.imread(str(DATA / name), cv2.IMREAD_COLOR)[:768, :768]
    assert niqe(np.ascontiguousarray(bgr[:, :, ::-1])) == pytest.approx(calculate_niqe(bgr, crop_border=0),
                                                                        abs=0.01)


def test_niqe_does_not_import_basicsr_or_torch(photo):
    """NIQE costs milliseconds, not the second or two of basicsr's package import (nor torch's) per CLI run."""
    code = ("import sys, cv2; from utils.metrics import niqe; "
            f"s = niqe(cv2.imread({str(PHOTO)!r})); "
            "print(round(s, 6), 'basicsr' in sys.modules, 'torch' in sys.modules, 'scipy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    score, *imported = out.stdout.split()
    assert float(score) == pytest.approx(niqe(photo[:, :, ::-1]), abs=1e-6)
    assert imported == ["False", "False", "False"]


def test_niqe_same_for_uint16_and_gray_consistent(photo):
    assert niqe(photo.astype(np.uint16) * 257) == pytest.approx(niqe(photo), abs=1e-6)
    gray = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    assert np.isfinite(niqe(gray))


def test_niqe_rejects_too_small_images():
    with pytest.raises(ValueError, match="at least"):
        niqe(np.zeros((100, 300, 3), np.uint8))


def test_niqe_of_flat_colour_blocks_is_nan_without_a_warning():
    """A drawing whose every block holds a flat fill (a logo upscaled): no block has NIQE's features, so the score
    is undefined. It was NaN with numpy's "Degrees of freedom <= 0" warning printed on the CLI's stderr."""
    image = np.zeros((192, 256, 3), np.uint8)
    image[:, :128], image[:, 128:], image[:32] = (255, 0, 0), (0, 0, 255), (0, 255, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(niqe(image))


# ---------------------------------------------------------------------------------------------- combined output
def test_quality_metrics_blur_upscale_vs_sharp_output(photo):
    # "input" = a half-size copy; "outputs" = the sharp photo vs a bicubic upscale of the input
    small = cv2.resize(photo, (128, 128), interpolation=cv2.INTER_AREA)
    m = quality_metrics(small, photo)
    assert m["niqe_output"] < m["niqe_input"]  # the real detail scores better than a bicubic upscale
    assert m["lr_psnr"] > 40  # INTER_AREA of the photo is exactly the input
    assert m["lpips"] is None and m["identity_similarity"] is None
    assert any("LPIPS" in w for w in m["warnings"])
    assert any("identity" in w for w in m["warnings"])
    _dumps(m)


def test_lpips_and_identity_are_none_with_reasons_when_networks_absent_or_unusable(photo):
    import torch

    face = photo[64:192, 64:192]
    # Real modules that do not fit: a per-pixel similarity is no distance, a 1-channel conv takes no RGB face.
    m = quality_metrics(photo, _nearest_2x(photo), face_pairs=[(face, _nearest_2x(face))],
                        lpips_network=torch.nn.CosineSimilarity(), identity_network=torch.nn.Conv2d(1, 4, 3))
    assert m["lpips"] is None and m["identity_similarity"] is None and m["identity_similarity_per_face"] is None
    assert any("LPIPS not computed" in w and "could not be used" in w for w in m["warnings"])
    assert any("identity similarity not computed" in w and "could not be used" in w for w in m["warnings"])
    m = quality_metrics(photo, _nearest_2x(photo), face_pairs=[(face, face)])
    assert any("LPIPS not computed" in w and "models download lpips-alexnet" in w for w in m["warnings"])
    assert any("ArcFace" in w and "models download arcface-ir-se50" in w for w in m["warnings"])


def test_calculate_image_metrics_is_json_safe_for_edge_cases(photo):
    full = calculate_image_metrics(photo, _nearest_2x(photo), 10_000, 40_000)
    text = _dumps(full)  # identical after downscale: PSNR capped, no inf
    assert json.loads(text)["lr_psnr"] == PSNR_CAP_DB
    assert full["size_change"] == "+300.0%" and full["scale_factor"] == "2.0x"

    flat = np.full((96, 96, 3), 128, np.uint8)
    flat_m = calculate_image_metrics(flat, _nearest_2x(flat))
    _dumps(flat_m)
    assert flat_m["niqe_input"] is None and flat_m["niqe_output"] is None  # undefined, reported as such
    assert any("NIQE" in w for w in flat_m["warnings"])

    tiny = calculate_image_metrics(photo[:8, :8], _nearest_2x(photo[:8, :8]))
    _dumps(tiny)
    assert tiny["lr_ssim"] is None and tiny["niqe_output"] is None
    assert any("SSIM" in w for w in tiny["warnings"]) and any("NIQE not computed" in w for w in tiny["warnings"])

    fast = calculate_image_metrics(photo, _nearest_2x(photo), quality=False)
    assert "lr_psnr" not in fast and fast["warnings"] == [] and fast["enhanced_size"] == "512x512"


def test_quality_metrics_reject_float_images():
    with pytest.raises(TypeError, match="uint8 or uint16"):
        quality_metrics(np.zeros((8, 8, 3), np.float32), np.zeros((16, 16, 3), np.uint8))


# ------------------------------------------------------------------------------------------------------- LPIPS
@pytest.fixture(scope="module")
def metric_weights(tmp_path_factory) -> Path:
    """A weights dir with an AlexNet trunk and an ArcFace IR-SE50 of the real architectures with random weights the
    test makes (the ImageNet and ArcFace weights can't be downloaded offline). The LPIPS linear layers are the real
    file the lpips package ships, checked against the catalog's SHA-256."""
    torch = pytest.importorskip("torch")
    import torchvision

    from engine.catalog import CATALOG
    from engine.downloader import sha256_file
    from engine.models.loader import reference_network

    folder = tmp_path_factory.mktemp("metric-weights")
    linear = CATALOG["lpips-alex-v0.1"]
    assert sha256_file(unverified_manager(folder).local_weights(linear.name)) == linear.sha256
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), folder / CATALOG["lpips-alexnet"].filename)
    arcface = CATALOG["arcface-ir-se50"]
    torch.save(reference_network(arcface.arch, arcface.arch_params).state_dict(), folder / arcface.filename)
    return folder


@pytest.fixture(scope="module")
def lpips_network(metric_weights):
    """The LPIPS network, loaded through the real model manager from the trunk and the linear layers."""
    network = unverified_manager(metric_weights).local_network("lpips-alex-v0.1")
    assert network is not None
    return network


def test_lpips_loads_the_trunk_into_the_right_layers(metric_weights, lpips_network):
    import torch

    from engine.catalog import CATALOG

    trunk = torch.load(metric_weights / CATALOG["lpips-alexnet"].filename, weights_only=True)
    convs = [m for m in lpips_network.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [tuple(trunk[f"features.{i}.weight"].shape)
                                                      for i in (0, 3, 6, 8, 10)]
    assert all(torch.equal(c.weight, trunk[f"features.{i}.weight"]) for c, i in zip(convs, (0, 3, 6, 8, 10)))
    linear_path = unverified_manager(metric_weights).local_weights("lpips-alex-v0.1")
    linear = torch.load(linear_path, map_location="cpu", weights_only=True)
    assert torch.equal(lpips_network.lin0.model[-1].weight, linear["lin0.model.1.weight"])


def test_lpips_is_zero_for_identical_images_and_grows_with_blur(photo, lpips_network):
    assert lpips_distance(photo, photo, lpips_network) == pytest.approx(0.0, abs=1e-6)
    light = cv2.GaussianBlur(photo, (0, 0), 1.0)
    heavy = cv2.GaussianBlur(photo, (0, 0), 4.0)
    d_light, d_heavy = lpips_distance(photo, light, lpips_network), lpips_distance(photo, heavy, lpips_network)
    assert 0.0 < d_light < d_heavy
    sixteen = photo.astype(np.uint16) * 257  # the range comes from the dtype: same picture, same distance
    assert lpips_distance(sixteen, light, lpips_network) == pytest.approx(d_light, rel=1e-4)
    with pytest.raises(ValueError, match="one size"):
        lpips_distance(photo, photo[:128], lpips_network)
    with pytest.raises(ValueError, match="at least 32"):
        lpips_distance(photo[:20, :20], photo[:20, :20], lpips_network)


def test_quality_metrics_report_lpips_in_input_space(photo, lpips_network):
    exact = quality_metrics(photo, _nearest_2x(photo), lpips_network=lpips_network)
    assert exact["lpips"] == pytest.approx(0.0, abs=1e-6)  # a 2x nearest upscale shrinks back to the input
    blurred = quality_metrics(photo, cv2.GaussianBlur(_nearest_2x(photo), (0, 0), 6.0), lpips_network=lpips_network)
    assert blurred["lpips"] > 0.0
    assert not any("LPIPS" in w for w in blurred["warnings"])
    tiny = quality_metrics(photo[:16, :16], _nearest_2x(photo[:16, :16]), lpips_network=lpips_network)
    assert tiny["lpips"] is None and any("smaller than 32x32" in w for w in tiny["warnings"])
    _dumps(blurred)


# ---------------------------------------------------------------------------------------------------- identity
def test_identity_similarity_with_arcface_weights(photo, metric_weights):
    """The real facexlib ArcFace architecture, random weights saved as a plain state dict and loaded through the
    model manager: identical faces give similarity 1, and the value is a finite number in [-1, 1] with a warning
    when low."""
    network = unverified_manager(metric_weights).local_network("arcface-ir-se50")
    face = photo[40:200, 60:200]
    noise = np.random.default_rng(1).integers(0, 256, face.shape, dtype=np.uint8)
    m = quality_metrics(photo, _nearest_2x(photo), face_pairs=[(face, face), (face, noise)],
                        identity_network=network)
    same, other = m["identity_similarity_per_face"]
    assert same == pytest.approx(1.0, abs=1e-3)
    assert -1.0 <= other < 0.99
    assert m["identity_similarity"] == pytest.approx((same + other) / 2, abs=1e-3)
    assert not any("identity similarity not computed" in w for w in m["warnings"])
    _dumps(m)


# ----------------------------------------------------------------------------------------------------- layering
def test_import_has_no_side_effects_and_respects_layers():
    code = ("import sys, utils.metrics; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('engine', 'ui', 'basicsr', 'gradio', 'torch')]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
