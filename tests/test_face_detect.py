"""Face detection: the offline LBP cascade on the labelled set, box mapping, landmarks, and RetinaFace (a network
the model manager loads, decoded here without state)."""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from engine.errors import InvalidInputError, ModelNotAvailableError
from engine.face_detect import FaceBox, FaceDetection, detect_faces, estimate_landmarks
from tests.conftest import unverified_manager

DATA = Path(__file__).parent / "data" / "advisor"
LABELS = json.loads((DATA / "labels.json").read_text())
#: Largest |found - true| face count the cascade reaches on the labelled set (children-alpha: 3 of 5 found).
COUNT_TOLERANCE = 2


def read_rgb(name: str) -> np.ndarray:
    image = cv2.imread(str(DATA / name), cv2.IMREAD_UNCHANGED)
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA if image.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return image


@pytest.mark.parametrize("name", sorted(LABELS))
def test_cascade_face_count_on_labelled_set(name):
    truth = LABELS[name]["faces"]
    result = detect_faces(read_rgb(name))
    assert result.detector == "lbp-cascade"
    found = len(result.faces)
    print(f"{name}: {found} faces found, {truth} true")
    if truth == 0:
        assert found == 0, f"false positive on {name}"
    else:
        assert found >= 1, f"no face found on {name}"
        assert abs(found - truth) <= COUNT_TOLERANCE


def test_boxes_are_in_input_pixels_and_well_formed():
    image = read_rgb("Adele_crop.png")  # 256x256, one centred face
    small = detect_faces(image).faces[0]
    big_image = cv2.resize(image, (1024, 1024), interpolation=cv2.INTER_CUBIC)  # scanned at 512 -> mapped back
    big = detect_faces(big_image).faces[0]
    assert 0 <= big.x0 < big.x1 <= 1024 and 0 <= big.y0 < big.y1 <= 1024
    centre_small = np.array([(small.x0 + small.x1) / 2, (small.y0 + small.y1) / 2])
    centre_big = np.array([(big.x0 + big.x1) / 2, (big.y0 + big.y1) / 2])
    np.testing.assert_allclose(centre_big / 4, centre_small, atol=12)
    assert big.width / 4 == pytest.approx(small.width, rel=0.35)
    assert 0.5 <= big.score <= 1.0
    assert big.landmarks is not None and len(big.landmarks) == 5
    assert all(big.x0 <= x <= big.x1 and big.y0 <= y <= big.y1 for x, y in big.landmarks)


def test_max_faces_and_min_size_filter():
    image = read_rgb("10045.png")
    every = detect_faces(image)
    assert len(every.faces) >= 2
    assert len(detect_faces(image, max_faces=1).faces) == 1
    assert detect_faces(image, max_faces=1).faces[0] == every.faces[0]  # best first
    assert detect_faces(image, min_size=10_000).faces == ()
    scores = [f.score for f in every.faces]
    assert scores == sorted(scores, reverse=True)


def test_gray_rgba_and_16bit_inputs():
    rgb = read_rgb("Justin_Timberlake_crop.png")
    base = detect_faces(rgb).faces
    assert len(base) == 1
    as16 = rgb.astype(np.uint16) * 257
    assert detect_faces(as16).faces == base
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    assert detect_faces(rgba).faces == base
    assert len(detect_faces(read_rgb("00017_gray.png")).faces) >= 1  # HxW gray


@pytest.mark.parametrize("kind", ["rgb16", "gray16", "rgba8"])
def test_a_16bit_or_rgba_input_is_scanned_without_a_whole_size_copy_besides_its_gray(kind):
    """The cascade needs the gray image only: a 16-bit or RGBA input is made gray band by band (converted whole,
    a 36 MP 16-bit photo's analysis held 0.8 GB more; here 24, 8 and 4 bytes per pixel were traced)."""
    import tracemalloc

    h, w = 2000, 3000
    rng = np.random.default_rng(0)
    image = {"rgb16": lambda: rng.integers(0, 65536, (h, w, 3), dtype=np.uint16),
             "gray16": lambda: rng.integers(0, 65536, (h, w), dtype=np.uint16),
             "rgba8": lambda: rng.integers(0, 256, (h, w, 4), dtype=np.uint8)}[kind]()
    detect_faces(np.full((64, 64, 3), 128, np.uint8))  # the cascades loaded before the measure
    tracemalloc.start()
    try:
        found = detect_faces(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found.detector == "lbp-cascade"
    assert peak < 3 * h * w, f"{peak / (h * w):.1f} bytes per pixel"  # the gray (1) and bands of 64 rows


@pytest.mark.parametrize(
    "bad", [np.zeros((0, 0, 3), np.uint8), np.zeros((4, 4, 2), np.uint8), np.zeros((8, 8, 3), np.float32)]
)
def test_bad_input_raises_value_error(bad):
    with pytest.raises(InvalidInputError):
        detect_faces(bad)
    with pytest.raises(ValueError):
        detect_faces(bad)


def test_tiny_image_has_no_faces():
    assert detect_faces(np.full((10, 10, 3), 128, np.uint8)) == FaceDetection(faces=(), detector="lbp-cascade")


def test_concurrent_calls_agree():
    images = [read_rgb("10045.png"), read_rgb("Blake_Lively.jpg")]
    expected = [detect_faces(im) for im in images]
    results: dict[int, list[FaceDetection]] = {}

    def work(i: int) -> None:
        results[i] = [detect_faces(images[i % 2]) for _ in range(2)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, runs in results.items():
        assert all(r == expected[i % 2] for r in runs)


def test_the_analysis_finds_the_faces_the_detector_finds_with_the_cascades_it_loaded_before():
    """The analysis detects on a thread of its own beside its measurements: the same faces as a direct call, and
    a loaded cascade is reused rather than loaded for each call (~6 ms each)."""
    from engine import face_detect
    from engine.image_analysis import analyze

    image = read_rgb("Blake_Lively.jpg")
    direct = detect_faces(image)
    assert direct.faces
    loaded = {id(c) for c in face_detect._free_cascades}  # at least the ones the direct call used, given back
    for _ in range(3):
        analysis = analyze(image)
        assert analysis.faces == direct.faces and analysis.face_detector == direct.detector
    assert {id(c) for c in face_detect._free_cascades} == loaded  # the same ones, none loaded again


@pytest.mark.parametrize("name", ["00.jpg", "children-alpha.png", "onepiece_105.jpg"])
@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_the_scan_shared_over_threads_finds_the_windows_of_one_whole_scan(monkeypatch, name, threads):
    """However many threads share the cascade's scales, the raw windows are skimage's own whole scan's, in its
    order (the clustering, and so the faces, depend on that order)."""
    from skimage.data import lbp_frontal_face_cascade_filename
    from skimage.feature import Cascade

    from engine import face_detect

    gray = cv2.cvtColor(np.ascontiguousarray(read_rgb(name)[:, :, :3]), cv2.COLOR_RGB2GRAY)
    height, width = gray.shape
    scale = face_detect.CASCADE_WORKING_SIDE / max(height, width)
    gray = cv2.resize(gray, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
    side = min(gray.shape)
    whole = Cascade(lbp_frontal_face_cascade_filename()).detect_multi_scale(
        gray, scale_factor=face_detect.CASCADE_SCALE_FACTOR, step_ratio=face_detect.CASCADE_STEP_RATIO,
        min_size=(face_detect.CASCADE_WINDOW,) * 2, max_size=(side, side), min_neighbor_number=0,
        intersection_score_threshold=1.0)
    assert whole  # something to compare
    monkeypatch.setattr(face_detect, "_scan_threads", lambda: threads)
    assert face_detect._scan(gray, side) == whole


def test_scales_are_shared_out_once_each_and_evenly_by_their_windows():
    from engine.face_detect import CASCADE_STEP_RATIO, CASCADE_WINDOW, share_scales

    factors = np.array([1.2 ** i for i in range(16)], np.float32)
    counts = []
    for f in factors:
        size, step = int(CASCADE_WINDOW * f), round(f * CASCADE_STEP_RATIO)
        counts.append(-(-(512 - size) // step) * -(-(384 - size) // step))
    assert share_scales(factors, 512, 384, 1) == [tuple(range(16))]
    for threads in (2, 3, 4):
        shares = share_scales(factors, 512, 384, threads)
        assert len(shares) == threads
        assert sorted(i for share in shares for i in share) == list(range(16))
        assert all(list(share) == sorted(share) for share in shares)
        loads = [sum(counts[i] for i in share) for share in shares]
        assert max(loads) <= sum(counts) / threads + max(counts)  # the greedy rule's bound
        assert max(loads) < 0.6 * sum(counts)  # a real share: one thread alone would do it all
    assert share_scales(factors[:2], 512, 384, 4) == [(0,), (1,)]  # no empty shares
    assert share_scales(factors, 10, 10, 2) == [tuple(range(16))]  # no window fits: nothing to share
    assert share_scales(factors[:0], 512, 384, 2) == []


@pytest.mark.parametrize("side", [24, 25, 28, 29, 30])
def test_images_about_the_cascade_window_get_no_faces(side):
    """Sides from the window's 24 px up: at first no scale fits (the scan has nothing to share out), then one."""
    assert detect_faces(np.full((side, side, 3), 128, np.uint8)) == FaceDetection(faces=(), detector="lbp-cascade")


def test_estimate_landmarks_proportions():
    points = estimate_landmarks((100.0, 50.0, 200.0, 150.0))
    (lex, ley), (rex, rey), (nx, ny), (lmx, lmy), (rmx, rmy) = points
    assert lex < nx < rex and lmx < nx < rmx
    assert ley == rey < ny < lmy == rmy
    assert all(100 <= x <= 200 and 50 <= y <= 150 for x, y in points)
    box = FaceBox(100.0, 50.0, 200.0, 150.0, 0.9, None)
    assert estimate_landmarks(box) == points
    with pytest.raises(ValueError):
        estimate_landmarks((10.0, 10.0, 5.0, 20.0))


def test_without_retinaface_weights_the_cascade_runs(model_manager):
    assert model_manager.local_network("detection_Resnet50_Final") is None  # not on this machine: never fetched
    result = detect_faces(read_rgb("Adele_crop.png"), retinaface=None)
    assert result.detector == "lbp-cascade" and len(result.faces) == 1


def test_corrupt_retinaface_weights_raise(tmp_path):
    from engine.catalog import CATALOG

    (tmp_path / CATALOG["detection_Resnet50_Final"].filename).write_bytes(b"not a checkpoint")
    with pytest.raises(ModelNotAvailableError, match="damaged"):
        unverified_manager(tmp_path).local_network("detection_Resnet50_Final")


@pytest.fixture(scope="module")
def retinaface(helper_weights_dir):
    """The real RetinaFace-ResNet50 with random weights, loaded through the model manager (``module.`` prefixed)."""
    return unverified_manager(helper_weights_dir).local_network("detection_Resnet50_Final")


def test_retinaface_branch_boxes_and_landmarks(retinaface):
    """The real weights can't be downloaded here: random weights test loading and output plumbing, not accuracy."""
    image = cv2.resize(read_rgb("Adele_crop.png"), (128, 128), interpolation=cv2.INTER_AREA)
    result = detect_faces(image, retinaface=retinaface)
    assert result.detector == "retinaface"
    for face in result.faces:
        assert 0 <= face.x0 < face.x1 <= 128 and 0 <= face.y0 < face.y1 <= 128
        assert face.landmarks is not None and len(face.landmarks) == 5
        assert 0.8 <= face.score <= 1.0


def test_retinaface_runs_on_a_bounded_copy_of_a_large_image_and_answers_in_its_pixels(retinaface, monkeypatch):
    """A 40 MP upload would have held ~8 GB in RetinaFace at its own size: it sees a shrunk copy (the cap is made
    small here so the random-weight network runs fast), and the faces come back in the input's pixels."""
    from engine import face_detect

    monkeypatch.setattr(face_detect, "RETINAFACE_CONFIDENCE", 0.5)  # random weights: detections to compare
    monkeypatch.setattr(face_detect, "RETINAFACE_MAX_PIXELS", 160 * 120)
    image = cv2.resize(read_rgb("Blake_Lively.jpg"), (480, 360), interpolation=cv2.INTER_AREA)
    seen: list[tuple[int, int]] = []
    hook = retinaface.register_forward_pre_hook(lambda _module, args: seen.append(tuple(args[0].shape[-2:])))
    try:
        found = detect_faces(image, retinaface=retinaface)
        assert seen == [(120, 160)]  # the network saw the shrunk copy only
        small = face_detect._detect_retinaface(cv2.resize(image, (160, 120), interpolation=cv2.INTER_AREA),
                                               retinaface)
    finally:
        hook.remove()
    small.sort(key=lambda f: -f.score)
    kept = [f for f in small if min(f.width, f.height) * 3 >= 16]  # detect_faces' min_size, in the input's pixels
    assert len(found.faces) == len(kept) > 0
    for face, ref in zip(found.faces, kept):
        assert face.score == ref.score
        np.testing.assert_allclose([face.x0, face.y0, face.x1, face.y1],
                                   [ref.x0 * 3, ref.y0 * 3, min(480, ref.x1 * 3), min(360, ref.y1 * 3)], atol=1e-3)
        np.testing.assert_allclose(np.array(face.landmarks), np.array(ref.landmarks) * 3, atol=1e-3)
        assert 0 <= face.x0 < face.x1 <= 480 and 0 <= face.y0 < face.y1 <= 360
    gray = image[:, :, 1]  # gray: shrunk before it is made RGB, the same faces as its RGB copy
    assert detect_faces(gray, retinaface=retinaface) == detect_faces(np.repeat(gray[:, :, None], 3, axis=2),
                                                                     retinaface=retinaface)


def test_the_detector_and_the_parser_are_held_channels_last_on_the_cpu_and_detect_the_same(
        retinaface, helper_weights_dir, monkeypatch):
    """oneDNN runs their convolutions faster channels-last (RetinaFace at 1 MP ~1.25x here): the model manager
    converts them once at load, and the faces are those of the same weights held as facexlib builds them."""
    from engine import face_detect

    parser = unverified_manager(helper_weights_dir).local_network("parsing_parsenet")
    for net in (retinaface, parser):
        kernels = [p for p in net.parameters() if p.dim() == 4 and p.shape[-1] > 1]
        assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    monkeypatch.setattr(face_detect, "RETINAFACE_CONFIDENCE", 0.5)  # random weights: detections to compare
    image = cv2.resize(read_rgb("Blake_Lively.jpg"), (160, 120), interpolation=cv2.INTER_AREA)
    as_built = copy.deepcopy(retinaface).to(memory_format=torch.contiguous_format)
    assert not next(p for p in as_built.parameters() if p.dim() == 4 and p.shape[-1] > 1).is_contiguous(
        memory_format=torch.channels_last)
    ours, reference = face_detect._detect_retinaface(image, retinaface), face_detect._detect_retinaface(image, as_built)
    assert len(ours) == len(reference) > 0
    for face, ref in zip(ours, reference):
        assert face.score == pytest.approx(ref.score, abs=1e-4)
        np.testing.assert_allclose([face.x0, face.y0, face.x1, face.y1], [ref.x0, ref.y0, ref.x1, ref.y1], atol=1e-2)


def test_a_gray_image_gives_the_faces_of_its_rgb_copy_without_making_one():
    gray = cv2.cvtColor(read_rgb("Adele_crop.png"), cv2.COLOR_RGB2GRAY)
    found = detect_faces(gray)
    assert found == detect_faces(np.repeat(gray[:, :, None], 3, axis=2)) == detect_faces(gray[:, :, None])
    assert found.faces and found.detector == "lbp-cascade"


def test_retinaface_decoding_matches_facexlib(retinaface, monkeypatch):
    """Our stateless decoding gives facexlib's ``RetinaFace.detect_faces`` boxes, scores and landmarks (a lower
    confidence threshold on both, so random weights give detections to compare)."""
    from engine import face_detect

    monkeypatch.setattr(face_detect, "RETINAFACE_CONFIDENCE", 0.5)
    image = cv2.resize(read_rgb("Blake_Lively.jpg"), (96, 80), interpolation=cv2.INTER_AREA)
    ours = face_detect._detect_retinaface(image, retinaface)
    reference = copy.deepcopy(retinaface)  # facexlib's method stores per-image values on the module
    with torch.inference_mode():
        dets = reference.detect_faces(np.ascontiguousarray(image[:, :, ::-1]), conf_threshold=0.5)
    expected = [d for d in dets if min(d[2], 96) > max(d[0], 0) and min(d[3], 80) > max(d[1], 0)]
    assert len(ours) == len(expected) > 0
    for face, det in zip(ours, expected):
        assert face.score == pytest.approx(float(det[4]), abs=1e-5)
        np.testing.assert_allclose([face.x0, face.y0, face.x1, face.y1],
                                   [max(0, det[0]), max(0, det[1]), min(96, det[2]), min(80, det[3])], atol=1e-3)
        np.testing.assert_allclose(np.array(face.landmarks).ravel(), det[5:15], atol=1e-3)
