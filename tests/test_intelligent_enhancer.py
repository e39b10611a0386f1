"""The advisor's decision rules are pure functions of numbers: tested here without images."""

from __future__ import annotations

import pytest

from engine.inference.planning import TileChoice
from engine.intelligent_enhancer import (AnalysisNumbers, MachineFacts, advisable_models, choose_scale, decide,
                                         denoise_from_noise, estimate_seconds)

OFFLINE = frozenset({"RealESRGAN_x4plus", "RealESRGAN_x4plus_anime_6B", "realesr-animevideov3",
                     "realesr-animevideov3-x2", "realesr-animevideov3-x3"})
DOWNLOADABLE = frozenset({"RealESRGAN_x4plus", "RealESRNet_x4plus", "RealESRGAN_x4plus_anime_6B", "RealESRGAN_x2plus",
                          "realesr-animevideov3", "realesr-general-x4v3", "realesr-general-wdn-x4v3", "GFPGANv1.3",
                          "GFPGANv1.4", "RestoreFormer"})


def cpu(available=OFFLINE, **kw) -> MachineFacts:
    kw.setdefault("macs_per_second", {})
    return MachineFacts(device="cpu", free_memory_bytes=16 * 2**30, available_models=available,
                        downloadable_models=DOWNLOADABLE, **kw)


def photo(**kw) -> AnalysisNumbers:
    values = dict(content_type="photo", confidence=0.9, faces=0, noise_level=0.02, jpeg_artifacts=0.05, blur=0.2,
                  width=640, height=480)
    values.update(kw)
    return AnalysisNumbers(**values)


def no_tile(_model):
    return TileChoice(0, 100 * 2**20)


def test_anime_gets_the_anime_model_with_a_plain_reason():
    advice = decide(photo(content_type="anime"), cpu(), tile_for=no_tile)
    assert advice.settings.model == "RealESRGAN_x4plus_anime_6B"
    assert any("anime model" in r for r in advice.reasons)
    assert advice.settings.face_enhance is False


def test_clean_photo_gets_x4plus():
    advice = decide(photo(), cpu(), tile_for=no_tile)
    assert advice.settings.model == "RealESRGAN_x4plus"
    assert advice.settings.precision == "fp32"


def test_noisy_photo_uses_general_model_when_available_with_denoise_from_noise():
    machine = cpu(available=OFFLINE | {"realesr-general-x4v3", "realesr-general-wdn-x4v3"})
    quiet = decide(photo(noise_level=0.18), machine, tile_for=no_tile)
    loud = decide(photo(noise_level=0.6), machine, tile_for=no_tile)
    assert quiet.settings.model == loud.settings.model == "realesr-general-x4v3"
    assert quiet.settings.denoise_strength < loud.settings.denoise_strength <= 1.0


@pytest.mark.parametrize("available", [
    OFFLINE, OFFLINE | {"realesr-general-x4v3", "RealESRGAN_x2plus"}, frozenset({"realesr-animevideov3"})])
@pytest.mark.parametrize("width, height, scale", [(640, 480, None), (640, 480, 2.0), (3000, 2000, None),
                                                  (100, 80, 1.5)])
def test_what_the_advisor_may_choose_for_a_size_covers_every_choice_it_makes(available, width, height, scale):
    """Known from the size alone (no pixel), so an automatic job's least cost is known before its decode."""
    machine = cpu(available=available)
    models, advised_scale = advisable_models(machine, width, height, scale)
    for content in ("photo", "anime"):
        for noise, jpeg, faces in ((0.0, 0.0, 0), (0.6, 0.0, 2), (0.02, 0.9, 0), (0.3, 0.5, 1)):
            advice = decide(photo(content_type=content, noise_level=noise, jpeg_artifacts=jpeg, faces=faces,
                                  width=width, height=height), machine, requested_scale=scale, tile_for=no_tile)
            assert advice.settings.model in models, (content, noise, jpeg)
            assert advice.settings.outscale == advised_scale


def test_what_the_advisor_may_choose_is_only_what_it_chooses():
    assert advisable_models(cpu(), 640, 480)[0] == {"RealESRGAN_x4plus", "RealESRGAN_x4plus_anime_6B"}
    richer = cpu(available=OFFLINE | {"realesr-general-x4v3", "RealESRGAN_x2plus"})
    assert advisable_models(richer, 640, 480, 2.0)[0] == {"RealESRGAN_x2plus", "realesr-general-x4v3",
                                                          "RealESRGAN_x4plus_anime_6B"}
    assert advisable_models(cpu(available=frozenset({"realesr-animevideov3"})), 64, 64)[0] == {"realesr-animevideov3"}


def test_noisy_photo_without_general_weights_says_how_to_get_them():
    advice = decide(photo(noise_level=0.4), cpu(), tile_for=no_tile)
    assert advice.settings.model == "RealESRGAN_x4plus"
    assert any("models download realesr-general-x4v3" in r for r in advice.reasons)


def test_jpeg_damage_counts_as_damage():
    machine = cpu(available=OFFLINE | {"realesr-general-x4v3"})
    assert decide(photo(jpeg_artifacts=0.6), machine, tile_for=no_tile).settings.model == "realesr-general-x4v3"


def test_faces_on_photo_turn_face_enhancement_on_and_say_so():
    advice = decide(photo(faces=3), cpu(), tile_for=no_tile)
    assert advice.settings.face_enhance is True
    assert any(r.startswith("3 faces found: face enhancement on") for r in advice.reasons)
    assert any("downloaded on first use" in r for r in advice.reasons)  # GFPGAN not available offline
    ready = decide(photo(faces=1), cpu(available=OFFLINE | {"GFPGANv1.4"}), tile_for=no_tile)
    assert any(r == "1 face found: face enhancement on (GFPGANv1.4)" for r in ready.reasons)


def test_faces_on_anime_or_disabled_stay_off_with_a_reason():
    anime = decide(photo(content_type="anime", faces=2), cpu(), tile_for=no_tile)
    assert anime.settings.face_enhance is False and any("drawn face" in r for r in anime.reasons)
    off = decide(photo(faces=2), cpu(face_enhancement_enabled=False), tile_for=no_tile)
    assert off.settings.face_enhance is False and any("turned off" in r for r in off.reasons)


def test_scale_small_large_and_output_limit():
    assert choose_scale(200, 150, 400_000_000)[0] == 4.0
    assert choose_scale(3000, 2000, 400_000_000)[0] == 2.0
    scale, why = choose_scale(1500, 1500, 16_000_000)
    assert scale == 2.66 and "limited" in why and 1500 * scale * 1500 * scale <= 16_000_000
    assert choose_scale(100, 100, 400_000_000, requested=3)[0] == 3.0


def test_big_image_on_cpu_offers_the_fast_model_with_times():
    slow_cpu = cpu(macs_per_second={"RealESRGAN_x4plus": 100e9, "realesr-animevideov3": 100e9})
    advice = decide(photo(width=1400, height=1000), slow_cpu, tile_for=no_tile)
    assert advice.estimated_seconds > 60
    assert advice.alternatives and advice.alternatives[0]["model"] == "realesr-animevideov3"
    assert advice.alternatives[0]["estimated_seconds"] < advice.estimated_seconds / 10
    assert any("on this CPU" in r for r in advice.reasons)


def test_gpu_gets_half_precision_and_no_slow_warning():
    gpu = MachineFacts(device="cuda:0", free_memory_bytes=8 * 2**30, available_models=OFFLINE,
                       downloadable_models=DOWNLOADABLE, macs_per_second={"RealESRGAN_x4plus": 30e12})
    advice = decide(photo(width=1400, height=1000), gpu, tile_for=lambda m: TileChoice(512, 900 * 2**20))
    assert advice.settings.precision == "fp16"
    assert advice.analysis["optimal_tile"] == 512 and advice.estimated_memory_mb == 900.0
    assert not advice.alternatives
    assert any(r.startswith("Tiles of 512 px fit the free memory (8.0 GB)") for r in advice.reasons)


@pytest.mark.parametrize("limit, says", [
    ("cache", "Tiles of 128 px: on this CPU small tiles stay in its caches"),
    ("working set", "Tiles of 128 px keep one row of tiles within 384 MB of working memory"),
    ("memory", "Tiles of 128 px fit the free memory"),
])
def test_the_tile_reason_names_what_limited_the_tile(limit, says):
    advice = decide(photo(width=1400, height=1000), cpu(), tile_for=lambda m: TileChoice(128, 300 * 2**20, limit))
    assert sum(r.startswith(says) for r in advice.reasons) == 1, advice.reasons


def test_missing_preferred_model_falls_back_to_an_available_one():
    only_compact = frozenset({"realesr-animevideov3"})
    advice = decide(photo(), cpu(available=only_compact), tile_for=no_tile)
    assert advice.settings.model == "realesr-animevideov3"
    assert any("not available here" in r for r in advice.reasons)


def test_estimates_follow_macs_and_throughput():
    machine = cpu(macs_per_second={"RealESRGAN_x4plus": 1e11, "realesr-animevideov3": 1e11})
    big = estimate_seconds("RealESRGAN_x4plus", 512, 512, machine)
    small = estimate_seconds("realesr-animevideov3", 512, 512, machine)
    assert big / small == pytest.approx(17_926_848 / 619_200)
    assert estimate_seconds("RealESRGAN_x4plus", 1024, 512, machine) == pytest.approx(2 * big)


def test_denoise_strength_is_monotonic_and_bounded():
    values = [denoise_from_noise(n, 0.0) for n in (0.0, 0.1, 0.2, 0.4, 0.8)]
    assert values == sorted(values) and 0.2 <= values[0] and values[-1] == 1.0


def test_cpu_with_native_bf16_is_offered_the_fast_mode():
    facts = cpu(macs_per_second={"RealESRGAN_x4plus": 100e9}, cpu_bf16_fast=True)
    advice = decide(photo(width=640, height=480), facts, tile_for=no_tile)
    fast = [a for a in advice.alternatives if a.get("precision") == "bf16"]
    assert fast and fast[0]["estimated_seconds"] == pytest.approx(advice.estimated_seconds / 3, rel=0.05)
    assert advice.settings.precision == "fp32"  # an offer, not the default
    plain = decide(photo(width=640, height=480), cpu(macs_per_second={"RealESRGAN_x4plus": 100e9}), tile_for=no_tile)
    assert not [a for a in plain.alternatives if a.get("precision") == "bf16"]


def test_the_content_reason_reaches_the_advice():
    unsure = "Photo or drawing is unclear (60% anime): the photo model, the safer mistake"
    advice = decide(photo(confidence=0.5, content_reason=unsure), cpu(), tile_for=no_tile)
    assert advice.settings.model == "RealESRGAN_x4plus" and any(r.startswith(unsure) for r in advice.reasons)
    faces = "1 human face found: a photo"
    advice = decide(photo(faces=1, content_reason=faces), cpu(), tile_for=no_tile)
    assert advice.settings.face_enhance is True and any(r.startswith(faces) for r in advice.reasons)
