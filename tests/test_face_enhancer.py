"""Face enhancement end to end: real detector, real GFPGANv1Clean architecture with random weights the test makes,
loaded through the real model manager from a test catalog entry; no network.

The test network is GFPGANv1Clean with the catalog's hyper-parameters except ``narrow=0.25`` (a quarter of the
channels), so one 512×512 face takes about a second on a CPU instead of ~15 s. Face runs are shared through
module-scoped fixtures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import threading
from pathlib import Path
from types import MappingProxyType

import cv2
import numpy as np
import pytest
from PIL import Image

from engine.catalog import CATALOG
from engine.errors import InvalidInputError, InvalidSettingsError
from engine.face_enhancer import (DetectedFace, FaceResult, FaceSettings, alignment_matrix, enhance_faces,
                                  feathered_face_mask, identity_pairs, landmarks_from_box, output_transform,
                                  paste_face, save_face_crops, select_faces)

FACES = Path(__file__).resolve().parent / "data" / "faces"
PHOTO = FACES / "blake_lively_245.png"  # one face, 245x162 RGB
GRAY = FACES / "00017_gray_250.png"  # two faces, 250x176 grey
RGBA = FACES / "children_alpha_283.png"  # five children, 283x175 RGBA with transparency
DRAWN = FACES.parent / "advisor" / "onepiece_000_q60.png"  # a One Piece frame whose character's face is detected
SCALE = 2


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def bicubic_x2(image: np.ndarray) -> np.ndarray:
    """The test's background upscaler (an ``Upscaler``): HxWxC uint8 -> 2Hx2WxC uint8."""
    out = cv2.resize(image, (image.shape[1] * SCALE, image.shape[0] * SCALE), interpolation=cv2.INTER_CUBIC)
    return out.reshape(out.shape[0], out.shape[1], *image.shape[2:])


def _test_spec(**changes):
    spec = CATALOG["GFPGANv1.4"]
    params = MappingProxyType({**spec.arch_params, "narrow": 0.25})
    return dataclasses.replace(spec, arch_params=params, url="http://127.0.0.1:9/GFPGANv1.4.pth", size_bytes=None,
                               **changes)


def _manager(weights_dir: Path, spec):
    from config import Config
    from engine.model_manager import ModelManager

    cfg = Config.from_env(env={}, dotenv_path=None, weights_dir=weights_dir, download_retries=0)
    return ModelManager(cfg, catalog={spec.name: spec})


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    """A model manager whose GFPGANv1.4 entry holds random weights (pinned by their real sha256)."""
    import torch

    from engine.models.loader import reference_network

    weights = tmp_path_factory.mktemp("face-weights")
    spec = _test_spec(sha256=None)
    torch.manual_seed(0)
    torch.save({"params_ema": reference_network(spec.arch, spec.arch_params).state_dict()},
               weights / spec.filename)
    spec = dataclasses.replace(spec, sha256=hashlib.sha256((weights / spec.filename).read_bytes()).hexdigest())
    return _manager(weights, spec)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return _read(PHOTO)


@pytest.fixture(scope="module")
def full(manager, photo) -> FaceResult:
    """The photo at strength 1 with crops (shared by several tests)."""
    settings = FaceSettings(strength=1.0, max_faces=2, save_crops=True)
    return enhance_faces(photo, bicubic_x2(photo), settings=settings, model_manager=manager)


@pytest.fixture(scope="module")
def half(manager, photo) -> FaceResult:
    settings = FaceSettings(strength=0.5, max_faces=2, save_crops=True, crop_size=640)
    return enhance_faces(photo, bicubic_x2(photo), settings=settings, model_manager=manager)


def _inside_boxes(shape: tuple[int, int], boxes, margin: float) -> np.ndarray:
    """Boolean HxW: True inside the boxes grown by ``margin`` × their size on every side."""
    inside = np.zeros(shape, dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mx, my = margin * (x1 - x0), margin * (y1 - y0)
        inside[max(0, math.floor(y0 - my)):math.ceil(y1 + my), max(0, math.floor(x0 - mx)):math.ceil(x1 + mx)] = True
    return inside


# ------------------------------------------------------------------------------------------ settings (pure)
@pytest.mark.parametrize("strength", [-0.01, 1.01, 2, float("nan"), "0.5", None, True])
def test_strength_outside_the_range_is_refused_not_clamped(strength):
    with pytest.raises(InvalidSettingsError, match="strength"):
        FaceSettings(strength=strength)


def test_settings_validation_and_crop_export_size():
    assert FaceSettings(strength=0).strength == 0.0 and FaceSettings(strength=1).strength == 1.0
    assert FaceSettings(crop_size=256).export_crop_size == 512
    assert FaceSettings(crop_size=1024).export_crop_size == 1024
    assert FaceSettings(model="RestoreFormer").model == "RestoreFormer"
    with pytest.raises(InvalidSettingsError, match="GFPGANv1.4"):
        FaceSettings(model="CodeFormer")
    with pytest.raises(InvalidSettingsError, match="max_faces"):
        FaceSettings(max_faces=0)
    with pytest.raises(InvalidSettingsError, match="crop_size"):
        FaceSettings(crop_size=0)


def _face(x0, y0, size, score=0.9):
    box = (x0, y0, x0 + size, y0 + size)
    return DetectedFace(box=box, score=score, landmarks=landmarks_from_box(box))


def test_face_selection_keeps_the_largest_and_says_what_it_left_out():
    faces = [_face(0, 0, 10), _face(50, 0, 30), _face(100, 0, 20)]
    chosen, warnings = select_faces(faces, 200, 100, only_center_face=False, max_faces=2)
    assert [f.box[2] - f.box[0] for f in chosen] == [30, 20]  # left to right
    assert len(warnings) == 1 and "1 of 3 faces" in warnings[0] and "limit is 2" in warnings[0]
    chosen, warnings = select_faces(faces, 200, 100, only_center_face=True, max_faces=20)
    assert [f.box[0] for f in chosen] == [100] and "centre" in warnings[0]
    assert select_faces(faces, 200, 100, only_center_face=False, max_faces=5) == (sorted(
        faces, key=lambda f: f.box[0]), [])


def test_output_transform_keeps_pixel_centres_aligned():
    m = output_transform(4, 4)
    # The centre of input pixel 0 covers output pixels 0..3, whose centre is 1.5.
    assert np.allclose(m @ [0, 0, 1], [1.5, 1.5, 1])
    assert np.allclose(m @ [9.5, 9.5, 1], [39.5, 39.5, 1])  # the far edge maps to the far edge


def test_feathered_mask_is_soft_zero_at_the_border_and_shared_read_only():
    mask = feathered_face_mask()
    assert mask.shape == (512, 512) and mask.dtype == np.float32
    assert mask[290, 256] == pytest.approx(1.0, abs=1e-3) and mask.max() <= 1.0
    assert not mask[:8].any() and not mask[:, -8:].any()
    assert 0.05 < mask[290, 256 + 118] < 0.95  # feathered at the ellipse edge
    assert not mask.flags.writeable


@pytest.mark.parametrize("scale", [2, 4])
def test_align_then_paste_back_lands_on_the_same_pixels(photo, scale):
    """An identity 'restoration' (the aligned face cut from the background) pasted back changes ~nothing, while a
    one-pixel misregistration would change every edge: the round trip through the output scale is exact."""
    background = cv2.resize(photo, (photo.shape[1] * scale, photo.shape[0] * scale), interpolation=cv2.INTER_CUBIC)
    box = (140.0, 29.0, 216.0, 105.0)  # the face of the test photo, in input pixels
    affine = alignment_matrix(landmarks_from_box(box))
    to_output = output_transform(scale, scale)
    aligned_from_output = np.vstack([affine, [0, 0, 1]]) @ np.linalg.inv(to_output)
    face = cv2.warpAffine(background, aligned_from_output[:2], (512, 512), flags=cv2.INTER_LINEAR)
    out = background.copy()
    assert paste_face(out, face, feathered_face_mask(), np.linalg.inv(aligned_from_output)[:2], 1.0)
    diff = np.abs(out.astype(np.int16) - background).max(axis=2)
    region = diff[int(box[1] * scale):int(box[3] * scale), int(box[0] * scale):int(box[2] * scale)]
    shifted = np.abs(np.roll(background, 1, axis=1).astype(np.int16) - background).max(axis=2)
    assert region.mean() < 0.1 * shifted[int(box[1] * scale):int(box[3] * scale),
                                         int(box[0] * scale):int(box[2] * scale)].mean()


def test_paste_face_into_16_bit_keeps_the_depth_and_the_scale():
    out = np.full((64, 64, 3), 40000, dtype=np.uint16)
    face = np.full((512, 512, 3), 200, dtype=np.uint8)  # 200/255 of full scale
    to_out = np.array([[0.125, 0, 0], [0, 0.125, 0]])  # the 512 frame onto the 64x64 image
    assert paste_face(out, face, feathered_face_mask(), to_out, 1.0)
    assert out.dtype == np.uint16
    assert out[36, 32, 0] == pytest.approx(200 * 257, abs=300) and out[0, 0, 0] == 40000


def test_paste_face_off_the_image_changes_nothing():
    out = np.full((40, 40, 4), 7, dtype=np.uint8)
    far_away = np.array([[0.1, 0, 1000.0], [0, 0.1, 1000.0]])
    assert paste_face(out, np.zeros((512, 512, 3), np.uint8), feathered_face_mask(), far_away, 1.0) is False
    assert (out == 7).all()


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_identity_pairs_cut_the_same_face_from_input_and_output(photo, scale):
    """For the identity metric: the input and a plain upscale, cut at the ArcFace-aligned position of the
    detector's landmarks, are the same picture; the upscale of a mirrored input is not."""
    h, w = photo.shape[:2]
    face = DetectedFace(box=(75.0, 20.0, 165.0, 120.0), score=1.0, landmarks=landmarks_from_box((75, 20, 165, 120)))
    up = cv2.resize(photo, (w * scale, h * scale), interpolation=cv2.INTER_CUBIC)
    (a, b), = identity_pairs(photo, up, [face.landmarks], output_transform(scale, scale))
    assert a.shape == b.shape == (112, 112, 3) and a.dtype == b.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 8  # interpolation differences only
    (_, mirrored), = identity_pairs(photo, np.ascontiguousarray(up[:, ::-1]), [face.landmarks],
                                    output_transform(scale, scale))
    assert np.abs(a.astype(int) - mirrored.astype(int)).mean() > 20


def test_restored_faces_come_with_their_identity_pairs(full):
    assert len(full.identity_pairs) == full.faces_restored
    assert all(a.shape == b.shape == (112, 112, 3) for a, b in full.identity_pairs)


# -------------------------------------------------------------------------------------- the full face path
def test_faces_are_found_restored_and_cropped(full, photo):
    assert full.faces_detected >= 1
    assert full.faces_restored == min(full.faces_detected, 2)
    assert full.detector
    assert full.image.shape == (photo.shape[0] * SCALE, photo.shape[1] * SCALE, 3) and full.image.dtype == np.uint8
    assert len(full.crops) == full.faces_restored == len(full.boxes)
    assert all(c.shape == (512, 512, 3) and c.dtype == np.uint8 for c in full.crops)
    assert full.as_report()["faces_restored"] == full.faces_restored


def test_paste_back_changes_pixels_only_around_the_detected_faces(full, photo):
    background = bicubic_x2(photo)
    changed = np.any(full.image != background, axis=2)
    near_faces = _inside_boxes(changed.shape, full.boxes, margin=0.3)
    assert changed.sum() > 0.3 * sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in full.boxes)
    assert not (changed & ~near_faces).any(), "pixels changed away from every detected face"
    # and inside each face box, the face was really replaced
    for box in full.boxes:
        assert changed[_inside_boxes(changed.shape, [box], margin=-0.2)].mean() > 0.5


def test_strength_zero_is_exactly_the_background(manager, photo):
    background = bicubic_x2(photo)
    result = enhance_faces(photo, background, settings=FaceSettings(strength=0.0), model_manager=manager)
    assert np.array_equal(result.image, background)
    assert result.faces_detected >= 1 and result.faces_restored == 0
    assert any("strength is 0" in w for w in result.warnings)


def test_strength_blends_between_the_background_and_the_restoration(full, half, photo):
    background = bicubic_x2(photo).astype(np.float32)
    assert half.boxes == full.boxes
    expected = background + 0.5 * (full.image.astype(np.float32) - background)
    # Each output is rounded to bytes once, so they agree within one level (plus one for the rounding of ``full``).
    assert np.abs(half.image.astype(np.float32) - expected).max() <= 1.5
    assert np.abs(half.image.astype(np.int16) - full.image).max() > 10
    assert all(c.shape == (640, 640, 3) for c in half.crops)


def test_grayscale_input_stays_grayscale(manager):
    gray = _read(GRAY)
    assert gray.ndim == 2
    result = enhance_faces(gray, upscaler=bicubic_x2, settings=FaceSettings(strength=1.0, max_faces=1),
                           model_manager=manager)
    assert result.image.shape == (gray.shape[0] * SCALE, gray.shape[1] * SCALE) and result.image.dtype == np.uint8
    assert result.faces_detected >= 1 and result.faces_restored == 1
    assert not np.array_equal(result.image, cv2.cvtColor(bicubic_x2(np.dstack([gray] * 3)), cv2.COLOR_RGB2GRAY))


def test_rgba_input_keeps_its_alpha_and_reports_faces_over_the_limit(manager):
    rgba = _read(RGBA)
    assert rgba.shape[2] == 4
    background = bicubic_x2(rgba)
    result = enhance_faces(rgba, background, settings=FaceSettings(strength=1.0, max_faces=1),
                           model_manager=manager)
    assert result.image.shape == background.shape
    assert np.array_equal(result.image[:, :, 3], background[:, :, 3])
    assert not np.array_equal(result.image[:, :, :3], background[:, :, :3])
    assert result.faces_restored == 1
    if result.faces_detected > 1:
        assert any("limit is 1" in w for w in result.warnings)


def test_missing_weights_give_the_background_and_say_how_to_download(tmp_path, photo):
    manager = _manager(tmp_path / "empty-weights", _test_spec(sha256=None))
    background = bicubic_x2(photo)
    result = enhance_faces(photo, background, settings=FaceSettings(), model_manager=manager)
    assert np.array_equal(result.image, background)
    assert result.faces_detected >= 1 and result.faces_restored == 0
    assert any("python main.py models download GFPGANv1.4" in w for w in result.warnings)


def test_damaged_weights_give_the_background_and_a_warning(tmp_path, photo):
    spec = _test_spec(sha256=None)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / spec.filename).write_bytes(b"this is not a checkpoint")
    background = bicubic_x2(photo)
    result = enhance_faces(photo, background, settings=FaceSettings(), model_manager=_manager(tmp_path / "w", spec))
    assert np.array_equal(result.image, background) and result.faces_restored == 0
    assert any("not restored" in w and "models download" in w for w in result.warnings)


def test_a_content_guess_never_skips_faces_the_detector_found(manager, photo):
    background = bicubic_x2(photo)
    guessed = enhance_faces(photo, background, settings=FaceSettings(strength=0.5), model_manager=manager,
                            content_type="anime")
    assert guessed.faces_detected >= 1 and guessed.faces_restored >= 1
    assert any("looked like a drawing" in w for w in guessed.warnings)
    forced = enhance_faces(photo, background, settings=FaceSettings(strength=0.5, force_on_anime=True),
                           model_manager=manager, content_type="anime")
    assert forced.faces_restored == guessed.faces_restored and not any("drawing" in w for w in forced.warnings)
    drawing = np.full_like(photo, 200)  # no face: the plain upscale, and the warning names both reasons
    plain = enhance_faces(drawing, bicubic_x2(drawing), settings=FaceSettings(), model_manager=manager,
                          content_type="anime")
    assert plain.faces_detected == 0 and any("No face" in w and "anime" in w for w in plain.warnings)


def test_a_drawn_face_is_left_as_the_upscale_unless_forced(manager):
    """A face drawn like the image it is in (engine.image_analysis.drawn_faces) is not restored on a drawing: GFPGAN
    would paint a human face on the character. Forced, it is."""
    from engine.image_analysis import content_type

    image = _read(DRAWN)
    guess, _ = content_type(image)
    left = enhance_faces(image, bicubic_x2(image), settings=FaceSettings(strength=0.5), model_manager=manager,
                         content_type=guess)
    assert guess == "anime" and (left.faces_detected, left.faces_restored) == (1, 0)
    assert any("looks drawn" in w and "--force-faces" in w for w in left.warnings)
    assert np.array_equal(left.image, bicubic_x2(image))
    forced = enhance_faces(image, bicubic_x2(image), settings=FaceSettings(strength=0.5, force_on_anime=True),
                           model_manager=manager, content_type=None)
    assert (forced.faces_detected, forced.faces_restored) == (1, 1)


def test_astronaut_at_200_px_the_count_shown_is_the_count_restored(manager):
    """Issue 14: at 200 px the advisor counted 1 face while enhance restored none ("looks like anime")."""
    from skimage import data as skdata

    from engine.image_analysis import analyze, content_type

    image = cv2.resize(skdata.astronaut(), (200, 200), interpolation=cv2.INTER_AREA)
    shown = analyze(image)
    guess, _ = content_type(image)  # what the pipeline hands the face enhancer
    result = enhance_faces(image, bicubic_x2(image), settings=FaceSettings(strength=0.5), model_manager=manager,
                           content_type=guess)
    assert shown.content_type == guess == "photo"
    assert len(shown.faces) == result.faces_detected == result.faces_restored == 1


def test_bad_arguments_are_refused(manager, photo):
    with pytest.raises(InvalidInputError, match="channels"):
        enhance_faces(photo, bicubic_x2(photo)[:, :, :1], settings=FaceSettings(), model_manager=manager)
    with pytest.raises(InvalidInputError, match="exactly one"):
        enhance_faces(photo, settings=FaceSettings(), model_manager=manager)
    with pytest.raises(InvalidInputError, match="uint8"):
        enhance_faces(photo.astype(np.float32), bicubic_x2(photo), settings=FaceSettings(), model_manager=manager)


def test_two_threads_at_once_give_the_same_bytes_as_one_alone(manager, photo, full):
    settings = FaceSettings(strength=1.0, max_faces=2, save_crops=True)
    background = bicubic_x2(photo)
    barrier = threading.Barrier(2)
    results: list[FaceResult | BaseException] = [None, None]

    def work(slot: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[slot] = enhance_faces(photo, background, settings=settings, model_manager=manager)
        except BaseException as exc:  # surfaced below
            results[slot] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for r in results:
        assert isinstance(r, FaceResult), r
        assert r.image.tobytes() == full.image.tobytes()
        assert [c.tobytes() for c in r.crops] == [c.tobytes() for c in full.crops]


def test_face_crops_are_saved_next_to_the_output(full, tmp_path):
    paths = save_face_crops(full, tmp_path / "holiday.out.png")
    assert [p.name for p in paths] == [f"holiday.out_face{i:02d}.png" for i in range(1, len(full.crops) + 1)]
    for path, crop in zip(paths, full.crops):
        assert np.array_equal(np.asarray(Image.open(path)), crop)


def test_an_automatic_job_restores_the_faces_the_advisor_found_without_detecting_them_again(
        tmp_path, config, model_manager, monkeypatch):
    """The advice's face detection of the decoded pixels goes with the job: the face enhancer restores those faces
    and does not run the detector again (RetinaFace takes seconds a photo on a CPU), so the count the advice
    shows is the count the job reports."""
    from engine import face_detect, image_analysis
    from engine.inference.batch import BatchJob, BatchServices, collect_inputs, run_batch
    from engine.intelligent_enhancer import IntelligentEnhancer
    from engine.settings import EnhanceSettings

    found = []
    detect = face_detect.detect_faces

    def counted(*args, **kwargs):
        detection = detect(*args, **kwargs)
        found.append(len(detection.faces))
        return detection

    monkeypatch.setattr(face_detect, "detect_faces", counted)  # the face enhancer's
    monkeypatch.setattr(image_analysis, "detect_faces", counted)  # the advisor's analysis
    advisor = IntelligentEnhancer(model_manager=model_manager, config=config, calibrate=False)
    services = BatchServices(model_manager, config, advisor)
    settings = EnhanceSettings(model="realesr-animevideov3", device="cpu", tile=0, quality_metrics=False)
    job = BatchJob(settings=settings, output_dir=tmp_path / "out", auto=True,
                   explicit={"model": "realesr-animevideov3", "outscale": 2})
    report = run_batch(collect_inputs([PHOTO]), job, services)
    item = report.items[0]
    assert item.ok, item.error
    assert found == [item.report["faces_detected"]] and found[0] >= 1  # one detection: the advisor's
    assert any("face enhancement on" in r for r in item.reasons), item.reasons
