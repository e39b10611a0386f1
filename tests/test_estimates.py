"""The learning time estimates: the pure update rule (engine.advisor.estimates.fit_timing), the crash-safe store,
and the advisor using what it learned. No timing is measured here: observations are given numbers."""

from __future__ import annotations

import json

import pytest

from engine.advisor.estimates import (KEEP, MIN_SPREAD, UNSURE_SPREAD, Observation, TimingStore, fit_timing, job_key,
                                      record_job)
from engine.intelligent_enhancer import AnalysisNumbers, MachineFacts, decide, estimate_range

GIGA = 1e9


def line(fixed: float, rate: float, macs: float) -> Observation:
    return Observation(macs, fixed + macs / rate)


def test_no_observation_gives_the_prior_as_a_wide_range():
    model = fit_timing([], prior_rate=50 * GIGA)
    assert model.macs_per_second == 50 * GIGA and model.spread == UNSURE_SPREAD and model.observations == 0
    low, high = model.range(100 * GIGA)
    assert low == pytest.approx(1.0) and high == pytest.approx(3.0)


def test_one_real_run_replaces_a_bad_calibration():
    # Calibrated on a busy machine at 20 GMAC/s; the real run shows 80 GMAC/s.
    model = fit_timing([Observation(800 * GIGA, 10.0)], prior_rate=20 * GIGA)
    assert model.seconds(400 * GIGA) == pytest.approx(5.0)
    assert model.spread == UNSURE_SPREAD  # one run: still shown as a range


def test_two_sizes_recover_the_fixed_cost_and_the_rate_exactly():
    runs = [line(3.0, 80 * GIGA, m * GIGA) for m in (100, 400, 1600)]
    model = fit_timing(runs, prior_rate=10 * GIGA)
    assert model.fixed_seconds == pytest.approx(3.0)
    assert model.macs_per_second == pytest.approx(80 * GIGA)
    assert model.spread == MIN_SPREAD


def test_one_busy_run_moves_the_estimate_little():
    clean = [line(2.0, 80 * GIGA, m * GIGA) for m in (100, 200, 400, 800, 1600)]
    busy = Observation(400 * GIGA, 3 * (2.0 + 400 / 80))  # 3x slower: another job shared the CPU
    model = fit_timing(clean + [busy], prior_rate=80 * GIGA)
    assert model.seconds(1000 * GIGA) == pytest.approx(2.0 + 1000 / 80, rel=0.1)


def test_the_rule_is_deterministic_and_order_free():
    runs = [Observation(m * GIGA, s) for m, s in ((100, 4.1), (300, 7.9), (900, 19.5), (250, 6.6))]
    a = fit_timing(runs, prior_rate=GIGA)
    assert a == fit_timing(list(reversed(runs)), prior_rate=GIGA) == fit_timing(runs, prior_rate=GIGA)
    with pytest.raises(ValueError):
        fit_timing(runs, prior_rate=0)


def test_store_keeps_the_newest_and_survives_a_damaged_file(tmp_path):
    path = tmp_path / "cfg" / "timings.json"
    store = TimingStore(path)
    key = job_key("cpu", "RealESRGAN_x4plus", "fp32", tiled=False)
    for i in range(KEEP + 3):
        store.add(key, Observation(GIGA * (i + 1), 1.0 + i))
    assert [o.seconds for o in TimingStore(path).observations(key)] == [1.0 + i for i in range(3, KEEP + 3)]
    store.add(key, Observation(GIGA, float("nan")))  # refused, file unchanged
    assert len(json.loads(path.read_text())[key]) == KEEP
    assert not list(path.parent.glob("*.tmp"))  # atomic write leaves no temporary file
    path.write_text("{not json")
    assert TimingStore(path).observations(key) == []


def test_record_job_files_a_finished_job_under_its_key(tmp_path):
    class Config:
        config_dir = tmp_path

    class Result:
        model, device, precision, tile = "realesr-animevideov3", "cpu", "fp32", 0
        input_size, faces_restored = (200, 100), 0

    record_job(Config, Result, 2.5)
    record_job(Config, type("Broken", (), {"model": "RealESRGAN_x4plus"}), 1.0)  # never raises
    stored = json.loads((tmp_path / "timings.json").read_text())
    assert list(stored) == ["cpu|realesr-animevideov3|fp32|whole"] and stored[list(stored)[0]][0][1] == 2.5


def test_the_advisor_shows_a_range_until_runs_agree_then_one_figure():
    numbers = AnalysisNumbers(content_type="photo", confidence=0.9, faces=0, noise_level=0.02, jpeg_artifacts=0.0,
                              blur=0.1, width=300, height=400)
    base = dict(device="cpu", free_memory_bytes=8 * 2**30, available_models=frozenset({"RealESRGAN_x4plus"}),
                downloadable_models=frozenset(), macs_per_second={"RealESRGAN_x4plus": 20 * GIGA})
    unsure = decide(numbers, MachineFacts(**base), tile_for=lambda m: (0, 1.0))
    assert any(" to " in r and "calibration" in r for r in unsure.reasons)
    learned = fit_timing([line(1.0, 80 * GIGA, m * GIGA) for m in (500, 1000, 2000)], prior_rate=20 * GIGA)
    sure = decide(numbers, MachineFacts(**base, timing={"RealESRGAN_x4plus": learned}), tile_for=lambda m: (0, 1.0))
    assert any("learned from 3 runs" in r for r in sure.reasons)
    seconds, low, high = estimate_range("RealESRGAN_x4plus", 300, 400, MachineFacts(**base,
                                        timing={"RealESRGAN_x4plus": learned}))
    assert sure.estimated_seconds == pytest.approx(seconds, abs=0.01) and low < seconds < high
    assert seconds < unsure.estimated_seconds / 3  # 80 vs 20 GMAC/s


def test_one_size_keeps_the_prior_fixed_cost_and_scales_the_rest():
    model = fit_timing([Observation(800 * GIGA, 10.0)], prior_rate=20 * GIGA, prior_fixed=2.0)
    assert model.fixed_seconds == 2.0 and model.seconds(400 * GIGA) == pytest.approx(2.0 + 4.0)
    tiny = fit_timing([Observation(GIGA, 1.0)], prior_rate=GIGA, prior_fixed=4.0)
    assert tiny.fixed_seconds == 0.5  # never more than half of what was measured
