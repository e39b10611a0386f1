"""Accuracy of the advisor's content decision on the labelled set of bench/fit_content_type.py, held out by source.

For every source (one photo, one clip, one synthetic family...), the content classifier is refitted without it and
its images are classified at every size (long side 128, 160, 240, 360, 512 px, native) and variant (clean, JPEG,
gray, noise, crop). Printed twice:

* ``classifier``: the sign of the held-out logit alone;
* ``advisor``: what ``analyze`` decides (:func:`engine.image_analysis.decide_content`): a human face found by the
  face detector (the same call the face enhancer makes) means photo; an unsure logit (inside
  +-ANIME_SURE_LOGIT/PHOTO_SURE_LOGIT) means photo unless a trial reconstruction says otherwise (not run here:
  see ``--trial``).

Then the held-out decisions on the sources added after the features were chosen (``more_sources``), the labelled
originals in tests/data/advisor with the shipped model (content type and face counts) and the
noise estimator's rank correlation with synthetic Gaussian sigma.

Run: .venv/bin/python bench/eval_advisor.py [--trial N]   (first run ~3 min on 2 cores: features and face counts
are cached in $TMPDIR/realesrgan-advisor-eval; --trial N also runs the trial reconstruction on N unsure samples)
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fit_content_type import (  # noqa: E402
    CACHE, DATA, _feature_version, dataset, leave_one_source_out, more_sources, read_rgb, report, rgb8, samples,
    sources)
from engine import face_detect  # noqa: E402
from engine.image_analysis import analyze, decide_content, noise_level, noise_sigma  # noqa: E402


def face_counts() -> np.ndarray:
    """Faces the detector finds in every sample of the set (cached: ~1 min)."""
    version = hashlib.sha256((_feature_version() + inspect.getsource(face_detect)).encode()).hexdigest()[:12]
    path = CACHE / f"faces-{version}.npy"
    if path.is_file():
        return np.load(path)
    counts = np.array([len(face_detect.detect_faces(pixels).faces) for *_, pixels in samples(sources())])
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, counts)
    return counts


def decisions(held_out: np.ndarray, faces: np.ndarray, trial: dict[int, float] | None = None) -> np.ndarray:
    """The advisor's held-out decision per sample as a signed score (> 0 anime), and which signal decided."""
    trial = trial or {}
    out = []
    for i, (logit, n) in enumerate(zip(held_out, faces)):
        d = decide_content(float(logit), int(n), trial.get(i))
        out.append((1.0 if d.label == "anime" else -1.0, d.decided_by))
    return np.array([o[0] for o in out]), np.array([o[1] for o in out])


def run_trials(data: dict, held_out: np.ndarray, faces: np.ndarray, limit: int) -> dict[int, float]:
    from config import Config
    from engine.advisor.trial import trial_reconstruction
    from engine.model_manager import ModelManager

    manager = ModelManager(Config())
    _, by = decisions(held_out, faces)
    unsure = np.where(by == "unsure")[0]
    pick = unsure[np.linspace(0, len(unsure) - 1, min(limit, len(unsure))).astype(int)] if len(unsure) else []
    wanted = set(int(i) for i in pick)
    results = {}
    for i, (*_, pixels) in enumerate(samples(sources())):
        if i in wanted:
            results[i] = trial_reconstruction(rgb8(pixels[..., :3] if pixels.ndim == 3 else pixels), manager
                                              ).photo_advantage_db
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trial", type=int, default=0, help="run the trial reconstruction on N unsure samples")
    args = parser.parse_args()
    data = dataset()
    y = data["y"]
    print(f"{len(y)} samples from {len(np.unique(data['source']))} sources "
          f"({int(y.sum())} anime, {int((1 - y).sum())} photo)")
    held_out = leave_one_source_out(data)
    print("== classifier alone, leave one source out ==")
    report(data, held_out, show_misses=0)
    faces = face_counts()
    trial = run_trials(data, held_out, faces, args.trial) if args.trial else None
    score, by = decisions(held_out, faces, trial)
    print("== advisor decision (faces -> photo; unsure -> photo" + (", trial" if trial else "") + ") ==")
    report(data, score, show_misses=25)
    right = (score > 0) == (y == 1)
    for signal in ("faces", "classifier", "unsure", "trial"):
        m = by == signal
        if m.any():
            print(f"decided by {signal:10s}: {m.sum():5d} samples, {right[m].mean():.3f} right")
    with_face = (faces > 0) & (y == 0)
    print(f"photos with a detected face: {with_face.sum()} samples, {right[with_face].mean():.3f} right; "
          f"anime samples with a (false) face: {int(((faces > 0) & (y == 1)).sum())}")
    if trial:
        t = np.array(list(trial))
        print(f"trial reconstruction on {len(t)} unsure samples: "
              f"{((np.array(list(trial.values())) < 0) == (y[t] == 1)).mean():.3f} right")

    more = np.isin(data["source"], sorted({item[0] for item in more_sources()}))
    if more.any():
        print("== the sources added after the features were chosen (bench/fit_content_type.more_sources), held out ==")
        report({k: v[more] for k, v in data.items()}, score[more], show_misses=0)

    print("== labelled originals (tests/data/advisor), shipped model ==")
    labels = json.loads((DATA / "labels.json").read_text())
    right_n = 0
    for name, label in labels.items():
        r = analyze(read_rgb(DATA / name))
        ok = r.content_type == label["content_type"]
        right_n += ok
        print(f"{name:28s} truth={label['content_type']:5s} got={r.content_type:5s} by={r.content_decided_by:10s} "
              f"logit={r.content_logit:+6.2f} {'ok ' if ok else 'MISS'} faces={len(r.faces)}/{label['faces']}")
    print(f"content type (labelled originals): {right_n}/{len(labels)}")

    print("== noise: Spearman(noise_level, sigma 0..50 step 5) on clean photos ==")
    for name in ("00003.png", "OST_009.png", "children-alpha.png", "10045.png"):
        image = read_rgb(DATA / name)[..., :3]
        rng = np.random.default_rng(0)
        sigmas = np.arange(0, 55, 5, dtype=np.float64)
        levels = [noise_level(np.clip(image + rng.normal(0, s, image.shape), 0, 255).astype(np.uint8))
                  for s in sigmas]
        ra, rb = np.argsort(np.argsort(sigmas)), np.argsort(np.argsort(levels))
        est = [round(noise_sigma(np.clip(image + rng.normal(0, s, image.shape), 0, 255).astype(np.uint8)), 1)
               for s in (0, 10, 25, 50)]
        print(f"{name:22s} spearman={np.corrcoef(ra, rb)[0, 1]:.3f} estimated sigma at 0/10/25/50: {est}")


if __name__ == "__main__":
    main()
