"""Accuracy of the advisor's measurements: content type and face counts on tests/data/advisor, content type on
held-out variants (other video frames, crops, downscales, JPEG re-compressions, scikit-image photos,
synthetic cartoons), the leave-one-source-out content-type accuracy of bench/fit_content_type.py (the honest
held-out figure: the model is refitted without each source), and the Spearman rank correlation of noise_level
with synthetic Gaussian sigma 0..50.

Run: .venv/bin/python bench/eval_advisor.py   (needs /work/shared/testdata for the video frames; skips them if absent)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.image_analysis import analyze, content_type, noise_level, noise_sigma  # noqa: E402

DATA = ROOT / "tests" / "data" / "advisor"
VIDEO = Path("/work/shared/testdata/realesrgan/inputs/video/onepiece_demo.mp4")
SHARED_OK = VIDEO.is_file()


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA if image.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return image


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image[..., :3], cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def half(image: np.ndarray) -> np.ndarray:
    return cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2), interpolation=cv2.INTER_AREA)


def centre(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    return image[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]


def cartoon(seed: int) -> np.ndarray:
    """Flat-colour polygons and discs with dark anti-aliased outlines."""
    rng = np.random.default_rng(seed)
    image = np.full((360, 480, 3), rng.integers(150, 255, 3), np.uint8)
    for _ in range(12):
        pts = np.stack([rng.integers(0, 480, 5), rng.integers(0, 360, 5)], 1).astype(np.int32)
        cv2.fillPoly(image, [pts], tuple(int(v) for v in rng.integers(0, 255, 3)))
        cv2.polylines(image, [pts], True, (0, 0, 0), 2, cv2.LINE_AA)
    for _ in range(5):
        c, r = (int(rng.integers(0, 480)), int(rng.integers(0, 360))), int(rng.integers(10, 60))
        cv2.circle(image, c, r, tuple(int(v) for v in rng.integers(0, 255, 3)), -1, cv2.LINE_AA)
        cv2.circle(image, c, r, (20, 20, 20), 3, cv2.LINE_AA)
    return image


def video_frames(indices: tuple[int, ...]) -> list[tuple[str, np.ndarray]]:
    if not VIDEO.is_file():
        return []
    import imageio_ffmpeg

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in indices:
            path = Path(tmp) / f"{n}.png"
            subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-i", str(VIDEO), "-vf",
                            f"select=eq(n\\,{n})", "-frames:v", "1", str(path)], check=True)
            out.append((f"onepiece_frame{n}", read_rgb(path)))
    return out


def held_out() -> list[tuple[str, str, np.ndarray]]:
    from skimage import data as skdata

    items: list[tuple[str, str, np.ndarray]] = []
    frames = video_frames((20, 50, 80, 125, 170))
    items += [(n, "anime", f) for n, f in frames]
    if frames:
        f = frames[1][1]
        items += [("frame50_half", "anime", half(f)), ("frame50_crop", "anime", centre(f)),
                  ("frame50_q40", "anime", jpeg(f, 40)), ("frame50_quarter", "anime", half(half(f)))]
    for name in ("0014.jpg", "0030.jpg"):
        f = read_rgb(DATA / name)
        items += [(name + "_x2", "anime", cv2.resize(f, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)),
                  (name + "_q50", "anime", jpeg(f, 50)), (name + "_crop", "anime", centre(f))]
    c = read_rgb(DATA / "comic.png")
    items += [("comic_crop", "anime", centre(c)), ("comic_q60", "anime", jpeg(c, 60))]
    items += [("skimage_logo", "anime", skdata.logo()[:, :, :3]), ("cartoon1", "anime", cartoon(1)),
              ("cartoon2_q75", "anime", jpeg(cartoon(2), 75))]
    for name in ("astronaut", "camera", "chelsea", "coffee", "rocket", "grass", "brick", "gravel",
                 "immunohistochemistry"):
        items.append((f"skimage_{name}", "photo", getattr(skdata, name)()))
    for name in ("00.jpg", "10045.png", "OST_009.png", "Adele_crop.png", "baboon.png"):
        f = read_rgb(DATA / name)[..., :3]
        items += [(name + "_crop", "photo", centre(f)), (name + "_q40", "photo", jpeg(f, 40)),
                  (name + "_half", "photo", half(f))]
    a = skdata.astronaut()
    items += [("astronaut_quarter", "photo", half(half(a))), ("astronaut_q30", "photo", jpeg(a, 30))]
    return items


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def noise_curve(image: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    sigmas = np.arange(0, 55, 5, dtype=np.float64)
    rng = np.random.default_rng(seed)
    levels = []
    for s in sigmas:
        noisy = np.clip(image.astype(np.float64) + rng.normal(0, s, image.shape), 0, 255).astype(np.uint8)
        levels.append(noise_level(noisy))
    return sigmas, np.array(levels)


def main() -> None:
    labels = json.loads((DATA / "labels.json").read_text())
    print("== labelled set: content type and faces (lbp-cascade) ==")
    right = 0
    for name, label in labels.items():
        result = analyze(read_rgb(DATA / name))
        ok = result.content_type == label["content_type"]
        right += ok
        note = f"  [known hard: {label['known_hard']}]" if "known_hard" in label else ""
        print(f"{name:28s} truth={label['content_type']:5s} got={result.content_type:5s} conf={result.confidence:.2f} "
              f"{'ok ' if ok else 'MISS'} faces={len(result.faces)}/{label['faces']} sigma={result.noise_sigma:5.1f} "
              f"jpeg={result.jpeg_artifacts:.2f} blur={result.blur:.2f}{note}")
    print(f"content type accuracy (labelled): {right}/{len(labels)}")
    print("== held-out variants: content type ==")
    items = held_out()
    right = 0
    for name, truth, image in items:
        label, conf = content_type(image)
        right += label == truth
        print(f"{name:28s} truth={truth:5s} got={label:5s} conf={conf:.2f} {'ok' if label == truth else 'MISS'}")
    print(f"content type accuracy (held-out): {right}/{len(items)}")
    print("== leave-one-source-out content type (refit without each source, all its variants held out) ==")
    if SHARED_OK:
        from bench.fit_content_type import dataset, report, sources

        report(*dataset(sources()))
    else:
        print("skipped: /work/shared/testdata not found")
    print("== noise: Spearman(noise_level, sigma 0..50 step 5) on clean photos ==")
    for name in ("00003.png", "OST_009.png", "children-alpha.png", "10045.png"):
        image = read_rgb(DATA / name)[..., :3]
        sigmas, levels = noise_curve(image)
        est = [round(noise_sigma(np.clip(image + np.random.default_rng(1).normal(0, s, image.shape), 0, 255)
                                 .astype(np.uint8)), 1) for s in (0, 10, 25, 50)]
        print(f"{name:22s} spearman={spearman(sigmas, levels):.3f} estimated sigma at 0/10/25/50: {est}")


if __name__ == "__main__":
    main()
