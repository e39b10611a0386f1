"""Accuracy of the advisor's content decision on the labelled set of bench/fit_content_type.py, held out by source.

For every source (one photo, one clip, one synthetic family...), the content classifier is refitted without it and
its images are classified at every size (long side 128, 160, 240, 360, 512 px, native) and variant (clean, JPEG,
gray, noise, crop). Printed:

* ``classifier``: the sign of the held-out logit alone;
* ``advisor``: what ``analyze`` decides (:func:`engine.image_analysis.decide_content`) without a trial: a human face
  found by the face detector (the same call the face enhancer makes) means photo, unless it is drawn like the image
  (:func:`engine.image_analysis.drawn_faces`, the face's pixels read by the refitted classifier); an unsure logit
  (inside +-ANIME_SURE_LOGIT/PHOTO_SURE_LOGIT) means photo;
* with ``--trial``, the advisor with the trial reconstruction (what the default config runs) settling the unsure
  samples: its rule (the gap between the compact anime model's and the photo model's rebuilds, weighed with the
  logit) refitted without the judged source, on the samples of the others whose held-out logit is within
  +-TRIAL_FIT_BAND; then the rule fitted on all of them, beside the shipped constants.

Then the held-out decisions on the sources added after the features were chosen (``more_sources``), the shipped
advisor's decisions on images outside its fit (``debian_sources``: wallpapers, game art and sky photos from the
Debian archive), the labelled originals in tests/data/advisor with the shipped model (content type and face counts)
and the noise estimator's rank correlation with synthetic Gaussian sigma.

Run: .venv/bin/python bench/eval_advisor.py [--trial]   (first run ~3 min on 2 cores, --trial ~3 min more:
features, face counts and trial gaps are cached in $TMPDIR/realesrgan-advisor-eval)
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import inspect
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fit_content_type import (  # noqa: E402
    CACHE, DATA, DEBIAN_FIT_IMAGES, DEBIAN_GAME_IMAGES, DEBIAN_MORE_IMAGES, _feature_version, balanced_weights,
    dataset, debian_sources, fit_classifier, fit_logistic, fit_shipped_scene_head, held_out_logits, more_sources,
    read_rgb, report, rgb8, samples, sources)
from engine import face_detect, image_analysis  # noqa: E402
from engine.image_analysis import (  # noqa: E402
    TRIAL_BIAS, TRIAL_GAP_WEIGHT, TRIAL_LOGIT_WEIGHT, analyze, decide_content, drawn_faces, noise_level, noise_sigma,
    pixels_logit)

TRIAL_FIT_BAND = 2.5  # the trial's rule is fitted on the samples whose held-out logit is within +-this


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


def human_face_counts(data: dict, held_out: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Faces per sample less the drawn ones (:func:`engine.image_analysis.drawn_faces`), the faces' pixels read by
    the classifier refitted without the sample's source, as ``held_out`` is (cached: ~2 min)."""
    rule = (inspect.getsource(face_detect) + inspect.getsource(drawn_faces)
            + repr((image_analysis.ANIME_SURE_LOGIT, image_analysis.DRAWN_FACE_MIN_SIDE,
                    image_analysis.DRAWN_FACE_LOGIT, image_analysis.MEASURES_WEIGHT))
            + inspect.getsource(fit_shipped_scene_head) + inspect.getsource(held_out_logits))
    version = hashlib.sha256((_feature_version() + rule).encode()).hexdigest()[:12]
    path = CACHE / f"human-faces-{version}.npy"
    if path.is_file():
        return np.load(path)
    x, y, src = data["x"], data["y"], data["source"]
    human, refitted = faces.copy(), {}
    for i, (source, *_, pixels) in enumerate(samples(sources())):
        if faces[i] == 0 or held_out[i] <= image_analysis.ANIME_SURE_LOGIT:
            continue
        if source not in refitted:
            keep = src != source
            refitted[source] = (fit_classifier(x[keep], y[keep], balanced_weights(y[keep], src[keep])),
                                fit_shipped_scene_head(data, keep))
        found = face_detect.detect_faces(pixels).faces
        crop_logit = functools.partial(pixels_logit, classifier=refitted[source][0], head=refitted[source][1])
        human[i] = len(found) - len(drawn_faces(pixels, found, float(held_out[i]), crop_logit))
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, human)
    return human


def decisions(held_out: np.ndarray, faces: np.ndarray, trial: dict[int, float] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """The advisor's held-out decision per sample as a signed score (> 0 anime), and which signal decided."""
    trial = trial or {}
    out = []
    for i, (logit, n) in enumerate(zip(held_out, faces)):
        d = decide_content(float(logit), int(n), trial.get(i))
        out.append((1.0 if d.label == "anime" else -1.0, d.decided_by))
    return np.array([o[0] for o in out]), np.array([o[1] for o in out])


def trial_gaps(held_out: np.ndarray) -> dict[int, float]:
    """The trial reconstruction's gap (:attr:`TrialResult.gap_db`) on every sample whose held-out logit is within
    +-TRIAL_FIT_BAND (cached: ~3 min on 2 cores)."""
    from config import Config
    from engine.advisor import trial
    from engine.model_manager import ModelManager

    wanted = set(np.where(np.abs(held_out) < TRIAL_FIT_BAND)[0].tolist())
    version = hashlib.sha256((_feature_version() + inspect.getsource(trial) + repr(sorted(wanted))).encode()
                             ).hexdigest()[:12]
    path = CACHE / f"trial-{version}.json"
    if path.is_file():
        return {int(k): v for k, v in json.loads(path.read_text()).items()}
    manager = ModelManager(Config())
    gaps = {}
    for i, (*_, pixels) in enumerate(samples(sources())):
        if i in wanted:
            rgb = rgb8(pixels[..., :3] if pixels.ndim == 3 else pixels)
            rgb = np.dstack([rgb] * 3) if rgb.ndim == 2 else rgb
            gaps[i] = trial.trial_reconstruction(rgb, manager).gap_db
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(gaps))
    return gaps


def fit_trial_rule(gap: np.ndarray, logit: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[gap weight, logit weight, bias] of the trial's rule (each class the same total weight)."""
    w = np.where(y == 1, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    return fit_logistic(np.c_[gap, logit], y, w, l2=1.0)


def held_out_trial_decisions(data: dict, held_out: np.ndarray, faces: np.ndarray, gaps: dict[int, float]
                             ) -> tuple[np.ndarray, np.ndarray]:
    """The advisor's decision with the trial rule refitted without each source (the trial samples of the other
    sources), applied to the source's unsure samples; returns (score, decided by) as :func:`decisions`."""
    y, src = data["y"], data["source"]
    score, by = decisions(held_out, faces)
    idx = np.array(sorted(gaps))
    gap = np.array([gaps[i] for i in idx])
    for name in np.unique(src[idx]):
        keep = src[idx] != name
        b = fit_trial_rule(gap[keep], held_out[idx][keep], y[idx][keep])
        for i, g in zip(idx[~keep], gap[~keep]):
            if by[i] == "unsure":
                score[i] = 1.0 if b[0] * g + b[1] * held_out[i] + b[2] > 0 else -1.0
                by[i] = "trial"
    return score, by


def unseen_decisions(trial_too: bool) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray] | None:
    """The shipped advisor's decisions on :func:`debian_sources` (images outside the fit, the evaluation set's sizes
    and variants): :func:`analyze` (faces, then the classifier; unsure reads photo), and with ``trial_too`` the
    trial reconstruction with the shipped rule on its unsure samples, as the advisor runs it. Returns (the samples'
    labels and names as :func:`dataset` has them, score without a trial, score with one), None without the images."""
    from config import Config
    from engine.advisor import trial
    from engine.model_manager import ModelManager

    items = debian_sources()
    if not items:
        return None
    manager = ModelManager(Config()) if trial_too else None
    rows: dict[str, list] = {k: [] for k in ("y", "source", "name", "size", "variant")}
    plain, tried = [], []
    for source, label, name, size, kind, pixels in samples(items):
        result = analyze(pixels)
        score = 1.0 if result.content_type == "anime" else -1.0
        plain.append(score)
        if manager is not None and result.content_decided_by == "unsure":
            rgb = rgb8(pixels[..., :3] if pixels.ndim == 3 else pixels)
            gap = trial.trial_reconstruction(np.dstack([rgb] * 3) if rgb.ndim == 2 else rgb, manager).gap_db
            score = 1.0 if decide_content(result.content_logit, 0, gap).label == "anime" else -1.0
        tried.append(score)
        for key, value in zip(rows, (label == "anime", source, name, size, kind)):
            rows[key].append(value)
    data = {k: np.array(v, dtype=float if k == "y" else None) for k, v in rows.items()}
    return data, np.array(plain), np.array(tried)


def from_sources(source: np.ndarray, rows) -> np.ndarray:
    """Which samples (their ``source`` column) come from a source of ``rows`` (items or image tables: the source
    first)."""
    return np.isin(source, sorted({row[0] for row in rows}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trial", action="store_true",
                        help="also the decision with the trial reconstruction on the unsure samples")
    args = parser.parse_args()
    data = dataset()
    y = data["y"]
    print(f"{len(y)} samples from {len(np.unique(data['source']))} sources "
          f"({int(y.sum())} anime, {int((1 - y).sum())} photo)")
    held_out = held_out_logits(data)
    print("== content log-odds alone (the measures' classifier and the scene head), leave one source out ==")
    report(data, held_out, show_misses=0)
    found = face_counts()
    faces = human_face_counts(data, held_out, found)
    runs = [("faces -> photo; unsure -> photo", *decisions(held_out, faces))]
    if args.trial:
        gaps = trial_gaps(held_out)
        runs.append(("faces -> photo; unsure -> the trial, its rule refitted without the source",
                     *held_out_trial_decisions(data, held_out, faces, gaps)))
    for title, score, by in runs:
        print(f"== advisor decision ({title}) ==")
        report(data, score, show_misses=25)
        right = (score > 0) == (y == 1)
        for signal in ("faces", "classifier", "unsure", "trial"):
            m = by == signal
            if m.any():
                print(f"decided by {signal:10s}: {m.sum():5d} samples, {right[m].mean():.3f} right")
        with_face = (found > 0) & (y == 0)
        drawn_all = (found > 0) & (faces == 0)
        print(f"photos with a detected face: {with_face.sum()} samples, {right[with_face].mean():.3f} right "
              f"({int((faces < found)[with_face].sum())} with a face taken for drawn); anime samples with a face "
              f"found: {int(((found > 0) & (y == 1)).sum())}, {int((drawn_all & (y == 1)).sum())} of them with "
              "every face taken for drawn")
    if args.trial:
        idx = np.array(sorted(gaps))
        gap, label = np.array([gaps[i] for i in idx]), y[idx]
        b = fit_trial_rule(gap, held_out[idx], label)
        print(f"trial gap on {len(idx)} samples with |held-out logit| < {TRIAL_FIT_BAND}: median photos "
              f"{np.median(gap[label == 0]):+.2f} dB, drawings {np.median(gap[label == 1]):+.2f} dB; rule fitted on "
              f"all: TRIAL_GAP_WEIGHT={b[0]:.2f} TRIAL_LOGIT_WEIGHT={b[1]:.2f} TRIAL_BIAS={b[2]:.2f} (shipped "
              f"{TRIAL_GAP_WEIGHT}, {TRIAL_LOGIT_WEIGHT}, {TRIAL_BIAS})")

    more = from_sources(data["source"], more_sources())
    debian_fit = from_sources(data["source"], DEBIAN_FIT_IMAGES)
    for title, group in (("the sources added after the features were chosen (bench/fit_content_type.more_sources)",
                          more),
                         ("Debian's photos and anime art (bench/fit_content_type.DEBIAN_FIT_IMAGES)", debian_fit),
                         ("the sources before Debian's joined the fit (to compare with figures before 2026-12-03)",
                          ~debian_fit)):
        if group.any() and not group.all():
            print(f"== {title}, held out, the last decision above ==")
            report({k: v[group] for k, v in data.items()}, score[group], show_misses=0)

    unseen = unseen_decisions(args.trial)
    if unseen is not None:
        data_u, plain, tried = unseen
        later = from_sources(data_u["source"], DEBIAN_MORE_IMAGES)
        games = from_sources(data_u["source"], DEBIAN_GAME_IMAGES)
        for title, group in (("all of them", np.ones(len(later), bool)),
                             (f"the {len(np.unique(data_u['name'][~games]))} before the game art joined (to compare "
                              "with figures before 2026-12-04)", ~games),
                             ("KDE's wallpapers and spacefun (DEBIAN_IMAGES, to compare with figures before "
                              "2026-12-03 17:00)", ~later & ~games),
                             ("Stellarium, SuperTux, Frozen Bubble, UKUI, GNOME (DEBIAN_MORE_IMAGES)", later),
                             ("Tux Paint, Teeworlds, Fish Fillets, Hannah's Horse, Pingus (DEBIAN_GAME_IMAGES)",
                              games)):
            if not group.any():
                continue
            subset = {k: v[group] for k, v in data_u.items()}
            print(f"== images the shipped model never saw (bench/fit_content_type.debian_sources): {title}; "
                  "shipped advisor without a trial ==")
            report(subset, plain[group], show_misses=0)
            if args.trial:
                print("== the same, with the trial on its unsure samples ==")
                report(subset, tried[group], show_misses=0)

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
