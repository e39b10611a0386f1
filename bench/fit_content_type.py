"""Fit and validate the content-type logistic in engine/image_analysis.py, leave-one-source-out.

Data: 48 images from 33 sources. Anime: Real-ESRGAN 0014/0030, the comic (gt and lq), 9 frames of onepiece_demo.mp4
(one source), scikit-image's bundled logo and horse. Photos: the Real-ESRGAN and GFPGAN inputs, baboon (gt and lq),
17 photos bundled with scikit-image. Each image also as variants: JPEG q30/50/75/95, 1/2 and 1/4 downscales,
centre and random half crops, Gaussian noise sigma 5, 1/2 downscale + JPEG q40, and gray (photos).

Protocol: for each source, fit the logistic (source-balanced, class-balanced, small L2) on all OTHER sources and
classify every image and variant of the left-out source; accuracy is over all of them. Then fit on everything and
print the weights, to be copied into ``CONTENT_WEIGHTS`` / ``CONTENT_BIAS``.

Run: .venv/bin/python bench/fit_content_type.py      (needs /work/shared/testdata; ~1 min on 2 cores)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.image_analysis import CONTENT_BIAS, CONTENT_WEIGHTS, content_features  # noqa: E402

SHARED = Path("/work/shared/testdata")
FEATURES = tuple(CONTENT_WEIGHTS)


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA if image.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return image


def video_frames(video: Path, indices: tuple[int, ...]) -> list[np.ndarray]:
    import imageio_ffmpeg

    select = "+".join(f"eq(n\\,{n})" for n in indices)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-i", str(video), "-vf",
                        f"select={select}", "-fps_mode", "passthrough", f"{tmp}/f%03d.png"], check=True)
        return [read_rgb(Path(tmp) / f"f{k + 1:03d}.png") for k in range(len(indices))]


def sources() -> list[tuple[str, str, np.ndarray]]:
    """(source, label, image) for every original image; several images may share a source."""
    import skimage
    from skimage import io as skio

    sk = Path(skimage.__file__).parent / "data"
    r, g = SHARED / "realesrgan", SHARED / "gfpgan" / "inputs"
    items = [("0014", "anime", read_rgb(r / "inputs/0014.jpg")), ("0030", "anime", read_rgb(r / "inputs/0030.jpg"))]
    frames = video_frames(r / "inputs/video/onepiece_demo.mp4", (0, 20, 50, 80, 105, 125, 135, 160, 180))
    items += [("onepiece", "anime", f) for f in frames]
    items += [("comic", "anime", read_rgb(r / f"tests/data/{d}/comic.png")) for d in ("gt", "lq")]
    items += [("sk_logo", "anime", skio.imread(sk / "logo.png")), ("sk_horse", "anime", skio.imread(sk / "horse.png"))]
    for name in ("00003.png", "ADE_val_00000114.jpg", "OST_009.png", "wolf_gray.jpg", "00017_gray.png",
                 "children-alpha.png", "tree_alpha_16bit.png"):
        items.append((Path(name).stem, "photo", read_rgb(r / "inputs" / name)))
    items += [("baboon", "photo", read_rgb(r / f"tests/data/{d}/baboon.png")) for d in ("gt", "lq")]
    for name in ("whole_imgs/00.jpg", "whole_imgs/10045.png", "whole_imgs/Blake_Lively.jpg",
                 "cropped_faces/Adele_crop.png", "cropped_faces/Julia_Roberts_crop.png",
                 "cropped_faces/Justin_Timberlake_crop.png", "cropped_faces/Paris_Hilton_crop.png"):
        items.append((Path(name).stem, "photo", read_rgb(g / name)))
    for name in ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "rocket.jpg", "brick.png", "grass.png",
                 "gravel.png", "ihc.png", "motorcycle_left.png", "coins.png", "moon.png", "retina.jpg",
                 "hubble_deep_field.jpg", "cell.png", "clock_motion.png", "text.png"):
        items.append(("sk_" + Path(name).stem, "photo", skio.imread(sk / name)))
    return items


def _rgb8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint16:
        image = (image / 257.0 + 0.5).astype(np.uint8)
    return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image[:, :, :3]


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    _, data = cv2.imencode(".jpg", cv2.cvtColor(_rgb8(image), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def variants(image: np.ndarray, label: str, rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """The original plus degraded/reframed copies (all 8-bit RGB or gray)."""
    out = [("orig", image)]
    base = _rgb8(image)
    h, w = base.shape[:2]
    out += [(f"q{q}", jpeg(base, q)) for q in (30, 50, 75, 95)]
    out += [(f"down{f}", cv2.resize(base, (w // f, h // f), interpolation=cv2.INTER_AREA))
            for f in (2, 4) if min(h, w) // f >= 32]
    if min(h, w) >= 96:
        y, x = int(rng.integers(0, h // 2 + 1)), int(rng.integers(0, w // 2 + 1))
        out += [("crop_c", base[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]),
                ("crop_r", base[y : y + h // 2, x : x + w // 2])]
    out.append(("noise5", np.clip(base + rng.normal(0, 5, base.shape) + 0.5, 0, 255).astype(np.uint8)))
    half = cv2.resize(base, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)
    out.append(("down2_q40", jpeg(half, 40)))
    if label == "photo":
        out.append(("gray", cv2.cvtColor(base, cv2.COLOR_RGB2GRAY)))
    return out


def dataset(
    items: list[tuple[str, str, np.ndarray]], seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """(features N x F, is_anime N, source N, variant N) over all items and their variants."""
    rng = np.random.default_rng(seed)
    rows, y, src, var = [], [], [], []
    for source, label, image in items:
        for name, v in variants(image, label, rng):
            f = content_features(v)
            rows.append([f[k] for k in FEATURES])
            y.append(label == "anime")
            src.append(source)
            var.append(name)
    return np.array(rows), np.array(y, float), src, var


def balanced_weights(y: np.ndarray, src: list[str]) -> np.ndarray:
    """Each source the same total weight, then both classes the same total weight."""
    s = np.array(src)
    w = np.zeros(len(y))
    for name in set(src):
        w[s == name] = 1.0 / (s == name).sum()
    for c in (0.0, 1.0):
        w[y == c] *= len(y) / 2.0 / w[y == c].sum()
    return w


def fit_logistic(x: np.ndarray, y: np.ndarray, w: np.ndarray, l2: float = 1e-3) -> np.ndarray:
    """Weighted L2-regularised logistic regression by Newton's method; returns [weights..., bias]."""
    xb = np.c_[x, np.ones(len(x))]
    b = np.zeros(xb.shape[1])
    reg = l2 * np.diag(np.r_[np.ones(x.shape[1]), 0.0])
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(xb @ b)))
        grad = xb.T @ ((p - y) * w) + reg @ b
        hess = (xb * (p * (1 - p) * w)[:, None]).T @ xb + reg
        b -= np.linalg.solve(hess + 1e-9 * np.eye(len(b)), grad)
    return b


def leave_one_source_out(x: np.ndarray, y: np.ndarray, src: list[str],
                         fit: Callable[..., np.ndarray] = fit_logistic) -> np.ndarray:
    """Held-out logit of every row, from a model fitted without any row of its source."""
    s = np.array(src)
    logits = np.zeros(len(y))
    for name in sorted(set(src)):
        out = s == name
        b = fit(x[~out], y[~out], balanced_weights(y[~out], [v for v, o in zip(src, out) if not o]))
        logits[out] = np.c_[x[out], np.ones(out.sum())] @ b
    return logits


def report(x: np.ndarray, y: np.ndarray, src: list[str], var: list[str]) -> float:
    logits = leave_one_source_out(x, y, src)
    right = (logits > 0) == (y == 1)
    orig = np.array(var) == "orig"
    for i in np.where(~right)[0]:
        print(f"  held-out miss: {src[i]:22s} {var[i]:10s} truth={'anime' if y[i] else 'photo'} logit={logits[i]:+.2f}")
    print(f"leave-one-source-out accuracy: all {right.mean():.3f} ({right.sum()}/{len(y)}), "
          f"originals {right[orig].mean():.3f} ({right[orig].sum()}/{orig.sum()}), "
          f"variants {right[~orig].mean():.3f}, anime {right[y == 1].mean():.3f}, photo {right[y == 0].mean():.3f}")
    shipped = np.c_[x, np.ones(len(x))] @ np.r_[[CONTENT_WEIGHTS[k] for k in FEATURES], CONTENT_BIAS]
    print(f"shipped weights on the same data (not held out): {((shipped > 0) == (y == 1)).mean():.3f}")
    return float(right.mean())


def main() -> None:
    x, y, src, var = dataset(sources())
    report(x, y, src, var)
    b = fit_logistic(x, y, balanced_weights(y, src))
    print("fit on all sources: CONTENT_WEIGHTS =", {k: round(float(v), 1) for k, v in zip(FEATURES, b)},
          f"CONTENT_BIAS = {b[-1]:.1f}")


if __name__ == "__main__":
    main()
