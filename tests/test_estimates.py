"""The learning time estimates: the pure update rule (engine.advisor.estimates.fit_timing), the load counted only
when the model is not loaded, the crash-safe store, the stage split a real run records, and the advisor using what
it learned. No timing is asserted: observations are given numbers, a real run is checked for its keys only."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.advisor.estimates import (FORMAT, KEEP, MIN_SPREAD, NETWORK_FIXED_SHARE, ONE_RUN_SPREAD,
                                      PRIOR_OVERHEAD_PER_PIXEL, UNSURE_SPREAD, Observation, TimingStore, fit_timing,
                                      job_key, load_key, record_job)
from engine.inference.planning import TileChoice
from engine.intelligent_enhancer import AnalysisNumbers, IntelligentEnhancer, MachineFacts, decide, estimate_range
from tests.conftest import DATA

GIGA = 1e9
MP = 1e6
FAST = "realesr-animevideov3"  # the small offline model


def run(macs_g: float, rate_g: float, pixels_mp: float = 1.0, overhead: float = 0.5, **kw) -> Observation:
    """A job of ``macs_g`` GMACs at ``rate_g`` GMAC/s, ``pixels_mp`` output megapixels and ``overhead`` seconds."""
    return Observation(macs_g * GIGA, macs_g / rate_g, pixels_mp * MP, overhead, **kw)


# ------------------------------------------------------------------------------------------------ the update rule
def test_no_run_gives_the_priors_as_a_wide_range():
    model = fit_timing([], [], prior_rate=50 * GIGA, prior_load=2.0, prior_face_seconds=3.0)
    assert model.macs_per_second == 50 * GIGA and model.load_seconds == 2.0 and model.face_seconds == 3.0
    assert model.spread == UNSURE_SPREAD and model.observations == 0
    low, high = model.range(100 * GIGA)
    assert low < model.seconds(100 * GIGA) < high


def test_one_real_run_corrects_a_busy_calibration():
    # Calibrated on a busy machine at 20 GMAC/s; the real run's network shows 80 GMAC/s (10 s for 800 GMACs).
    model = fit_timing([run(800, 80, overhead=1.0)], [], prior_rate=20 * GIGA)
    assert model.seconds(800 * GIGA, MP) == pytest.approx(10.0 + 1.0)  # the same job: what it took
    assert model.network_fixed == pytest.approx(NETWORK_FIXED_SHARE * 10.0)
    # A job 4x as large: between "all fixed" and "all proportional", never the calibration's 4x-slow figure.
    network = model.seconds(3200 * GIGA) - model.seconds(0.0)
    assert 10.0 < network + model.network_fixed < 40.0 and network + model.network_fixed < 3200 / 20
    # ... and near proportional: the CPU network's time is proportional to its MACs from 64 px up (measured; the
    # fixed part is milliseconds), so a larger image's estimate from one small run must not fall far short.
    assert network + model.network_fixed > 0.9 * 40.0
    assert model.spread == ONE_RUN_SPREAD < UNSURE_SPREAD  # one run: still a range, narrower than the calibration's


def test_one_run_learns_the_rate_whatever_the_overhead_and_load_were():
    # A first run with a slow load and a large overhead: the network rate comes from the network's seconds alone.
    slow_first = run(100, 80, pixels_mp=0.15, overhead=6.0)
    model = fit_timing([slow_first], [9.0], prior_rate=20 * GIGA)
    assert model.load_seconds == 9.0 and model.network_fixed + 100 * GIGA / model.macs_per_second == 100 / 80
    # The overhead is the prior's per-pixel rate (saving) and the rest fixed (imports in a fresh process).
    assert model.overhead_per_pixel == PRIOR_OVERHEAD_PER_PIXEL
    assert model.overhead_fixed == pytest.approx(6.0 - 0.15 * MP * PRIOR_OVERHEAD_PER_PIXEL)


def test_two_sizes_recover_both_lines_exactly():
    runs = [Observation(m * GIGA, 2.0 + m / 80, p * MP, 0.3 + 0.2 * p) for m, p in ((100, 1), (400, 4), (1600, 16))]
    model = fit_timing(runs, [], prior_rate=10 * GIGA)
    assert model.overhead_fixed == pytest.approx(0.3) and model.overhead_per_pixel == pytest.approx(0.2 / MP)
    assert model.network_fixed == pytest.approx(2.0) and model.macs_per_second == pytest.approx(80 * GIGA)
    assert model.spread == MIN_SPREAD


def test_one_busy_run_among_several_moves_the_estimate_little():
    clean = [run(m, 80) for m in (100, 200, 400, 800)]
    busy = run(400, 80 / 3)  # 3x slower: another job shared the CPU
    truth = fit_timing(clean, [], prior_rate=80 * GIGA)
    for runs in (clean + [busy], [busy] + clean):
        model = fit_timing(runs, [], prior_rate=80 * GIGA)
        assert model.seconds(1000 * GIGA, MP) == pytest.approx(truth.seconds(1000 * GIGA, MP), rel=0.1)


def test_the_newest_runs_weigh_more_when_the_machine_changed():
    runs = [run(100, 40)] * 3 + [run(100, 80)] * 3  # the machine became twice as fast
    model = fit_timing(runs, [], prior_rate=GIGA)
    assert model.network_fixed + 100 * GIGA / model.macs_per_second == pytest.approx(100 / 80)


def test_faces_are_learned_per_face_and_the_rule_is_deterministic():
    runs = [run(100, 80, faces=2, face_seconds=6.0), run(100, 80), run(300, 80, faces=1, face_seconds=3.0)]
    a = fit_timing(runs, [4.0, 5.0], prior_rate=GIGA, prior_face_seconds=99.0)
    assert a.face_seconds == pytest.approx(3.0)
    assert a == fit_timing(runs, [4.0, 5.0], prior_rate=GIGA, prior_face_seconds=99.0)
    with pytest.raises(ValueError):
        fit_timing(runs, [], prior_rate=0)


# ------------------------------------------------------------------------------------------------ the store
def test_store_round_trip_keeps_the_newest(tmp_path):
    path = tmp_path / "cfg" / "timings.json"
    store = TimingStore(path)
    key, lkey = job_key("cpu", FAST, "fp32", tiled=False), load_key("cpu", FAST, "fp32")
    for i in range(KEEP + 3):
        store.add(key, run(i + 1, 10, faces=i % 2, face_seconds=float(i % 2)), (lkey, 1.0 + i))
    again = TimingStore(path)  # another process
    assert again.observations(key) == store.observations(key)
    assert [o.macs for o in again.observations(key)] == [(i + 1) * GIGA for i in range(3, KEEP + 3)]
    assert again.loads(lkey) == [1.0 + i for i in range(3, KEEP + 3)]
    assert json.loads(path.read_text())["format"] == FORMAT
    # A run written by another process is seen without a new store.
    again.add(key, run(99, 10))
    assert store.observations(key)[-1].macs == 99 * GIGA


def test_store_refuses_bad_runs_and_survives_a_crash_or_damage(tmp_path, monkeypatch):
    path = tmp_path / "timings.json"
    store = TimingStore(path)
    key = job_key("cpu", FAST, "fp32", tiled=False)
    store.add(key, run(1, 1))
    before = path.read_bytes()
    store.add(key, Observation(GIGA, float("nan"), MP, 0.1))  # refused, file unchanged
    assert path.read_bytes() == before

    def crash(*_args):  # the process dies between writing the temporary file and renaming it
        raise OSError("killed")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash)
        store.add(key, run(2, 1))  # logged, never raised
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))
    assert len(TimingStore(path).observations(key)) == 1
    path.write_text("{not json")
    assert TimingStore(path).observations(key) == []


def test_a_file_of_the_old_format_is_ignored_and_replaced(tmp_path):
    path = tmp_path / "timings.json"
    key = job_key("cpu", FAST, "fp32", tiled=False)
    path.write_text(json.dumps({key: [[1e9, 2.0]]}))  # format 1: (MACs, whole seconds) pairs
    store = TimingStore(path)
    assert store.observations(key) == []
    store.add(key, run(1, 1))
    assert json.loads(path.read_text())["format"] == FORMAT and len(store.observations(key)) == 1


def test_record_job_splits_the_stages_and_keeps_only_real_loads(tmp_path):
    class Config:
        config_dir = tmp_path

    class Result:
        model, device, precision, tile = FAST, "cpu", "fp32", 0
        input_size, faces_restored, pixels = (20, 10), 0, np.zeros((40, 80, 3), np.uint8)
        timings = {"decode": 0.1, "load": 1.5, "inference": 2.0, "metrics": 0.2}

    record_job(Config, Result, 4.0)
    Result.timings = dict(Result.timings, load=0.0001)  # the model was cached: not a load
    record_job(Config, Result, 2.5)
    record_job(Config, type("Broken", (), {"model": "RealESRGAN_x4plus"}), 1.0)  # never raises
    store = TimingStore(tmp_path / "timings.json")
    runs = store.observations(job_key("cpu", FAST, "fp32", tiled=False))
    assert [r.network_seconds for r in runs] == [2.0, 2.0] and runs[0].output_pixels == 80 * 40
    assert [r.overhead_seconds for r in runs] == pytest.approx([0.5, 0.4999])
    assert store.loads(load_key("cpu", FAST, "fp32")) == [1.5]


# ------------------------------------------------------------------------------------------------ real run + advisor
def test_a_real_run_records_its_stages_and_the_load_is_counted_until_loaded(tmp_path, config, model_manager):
    from engine.inference.batch import BatchJob, BatchServices, collect_inputs, run_item
    from engine.settings import EnhanceSettings

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(src / "a.png")
    settings = EnhanceSettings(model=FAST, device="cpu", precision="fp32", tile=0, quality_metrics=False)
    job = BatchJob(settings=settings, output_dir=tmp_path / "out")
    advisor = IntelligentEnhancer(model_manager, config, device="cpu", calibrate=False)
    assert not model_manager.is_loaded(FAST, "cpu", "fp32")
    before = advisor.cached_estimate_seconds(FAST, 16, 12)
    assert before is None  # neither a calibration nor a run yet

    item = run_item(collect_inputs([src])[0], job, BatchServices(model_manager, config))
    assert item.ok and {"decode", "load", "inference", "metrics"} <= set(item.report["timings"])
    assert model_manager.is_loaded(FAST, "cpu", "fp32") and not model_manager.is_loaded(FAST, "cpu", "bf16")
    runs = advisor.timings.observations(job_key("cpu", FAST, "fp32", tiled=False))
    assert len(runs) == 1 and runs[0].output_pixels == 64 * 48
    learned = advisor._learned(FAST, "cpu", "fp32", False, 1e9)
    assert learned.load_seconds == 0.0  # loaded now: not counted
    assert advisor.cached_estimate_seconds(FAST, 16, 12) is not None  # the REST check has a figure now


def test_a_job_kept_in_memory_is_learned_too(tmp_path, config, model_manager):
    """The REST API's jobs keep their result in memory (no output file): they teach the estimates as saved ones."""
    from engine.inference.batch import BatchInput, BatchJob, BatchServices, run_batch
    from engine.settings import EnhanceSettings

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    settings = EnhanceSettings(model=FAST, device="cpu", precision="fp32", tile=0, quality_metrics=False)
    item = run_batch([BatchInput(buf.getvalue(), Path("upload"))], BatchJob(settings=settings),
                     BatchServices(model_manager, config)).items[0]
    assert item.ok and item.output is None and item.result is not None
    runs = IntelligentEnhancer(model_manager, config, calibrate=False).timings.observations(
        job_key("cpu", FAST, "fp32", tiled=False))
    assert len(runs) == 1 and runs[0].output_pixels == 64 * 48 and runs[0].network_seconds > 0


def test_the_advisor_counts_the_load_only_when_the_model_is_not_loaded(config, model_manager):
    advisor = IntelligentEnhancer(model_manager, config, device="cpu", calibrate=False)
    advisor.timings.add(job_key("cpu", FAST, "fp32", tiled=False), run(1, 10),
                        (load_key("cpu", FAST, "fp32"), 3.0))
    assert advisor._learned(FAST, "cpu", "fp32", False, GIGA).load_seconds == 3.0
    model_manager.load_model(FAST, "cpu", "fp32")
    assert advisor._learned(FAST, "cpu", "fp32", False, GIGA).load_seconds == 0.0


def test_the_advisor_shows_a_range_until_runs_agree_then_one_figure():
    numbers = AnalysisNumbers(content_type="photo", confidence=0.9, faces=0, noise_level=0.02, jpeg_artifacts=0.0,
                              blur=0.1, width=300, height=400)
    base = dict(device="cpu", free_memory_bytes=8 * 2**30, available_models=frozenset({"RealESRGAN_x4plus"}),
                downloadable_models=frozenset(), macs_per_second={"RealESRGAN_x4plus": 20 * GIGA})
    unsure = decide(numbers, MachineFacts(**base), tile_for=lambda m: TileChoice(0, 2**20))
    assert any(" to " in r and "calibration" in r for r in unsure.reasons)
    learned = fit_timing([run(m, 80, pixels_mp=m / 100) for m in (500, 1000, 2000)], [], prior_rate=20 * GIGA)
    sure = decide(numbers, MachineFacts(**base, timing={"RealESRGAN_x4plus": learned}),
                  tile_for=lambda m: TileChoice(0, 2**20))
    assert any("learned from 3 runs" in r for r in sure.reasons)
    seconds, low, high = estimate_range("RealESRGAN_x4plus", 300, 400, MachineFacts(**base,
                                        timing={"RealESRGAN_x4plus": learned}))
    assert sure.estimated_seconds == pytest.approx(seconds, abs=0.01) and low < seconds < high
    assert seconds < unsure.estimated_seconds / 3  # 80 vs 20 GMAC/s


def test_a_calibration_is_kept_only_when_the_process_got_its_cores():
    from engine.intelligent_enhancer import starved

    assert not starved(cpu_seconds=1.9, wall_seconds=1.0, threads=2)  # both cores, all the time
    assert not starved(cpu_seconds=1.3, wall_seconds=1.0, threads=2)  # 65%: a little noise
    assert starved(cpu_seconds=0.5, wall_seconds=1.0, threads=2)  # another program held a core and more
    assert not starved(cpu_seconds=0.0, wall_seconds=0.0, threads=2)  # nothing timed


def test_one_calibration_serves_every_model_of_its_class(config):
    """The catalog's RRDBNets share one measured rate (the same layers), and so do its compact networks: the
    quickest of a class is timed, once; a model's own figure, when one was kept, wins."""
    from engine.intelligent_enhancer import ThroughputCalibrator, rate_class, rate_siblings

    x4plus, anime, x2plus = "RealESRGAN_x4plus", "RealESRGAN_x4plus_anime_6B", "RealESRGAN_x2plus"
    assert rate_siblings(x4plus)[0] == x2plus  # 4.5 M MACs per input pixel, the fewest of its class
    assert {anime, "RealESRNet_x4plus"} <= set(rate_siblings(x4plus)) and FAST not in rate_siblings(x4plus)
    assert rate_class("realesr-general-x4v3") == rate_class(FAST) != rate_class(x4plus)
    path = config.config_dir / "calibration.json"
    calibrator = ThroughputCalibrator(path, size=32, busy_share=0)  # small, and kept whatever the load
    timed = []
    measure = calibrator._measure

    def spy(model, device, network=None):
        timed.append(model)
        return measure(model, device, network)

    calibrator._measure = spy
    rate = calibrator.macs_per_second(x4plus, "cpu")
    assert timed == [x2plus] and rate > 0
    assert [calibrator.macs_per_second(m, "cpu") for m in (anime, x2plus, "RealESRNet_x4plus")] == [rate] * 3
    assert timed == [x2plus] and calibrator.cached(FAST, "cpu") is None  # another class: nothing known
    assert list(json.loads(path.read_text())) == [calibrator.key(x2plus, "cpu")]  # kept under the timed model
    _calibrated(config, {x4plus: 1 * GIGA, x2plus: 5 * GIGA})
    kept = ThroughputCalibrator(path)
    assert kept.cached(x4plus, "cpu") == 1 * GIGA and kept.cached(anime, "cpu") == 5 * GIGA


def test_reading_the_figures_never_waits_for_a_calibration_in_progress(config):
    """A server's up-front time-limit check reads the figures in its event loop while the warm-up or an Analyze
    calibrates: the read answers at once (it waited on the lock a measurement held for seconds on a CPU, and the
    event loop waited with it); a second caller of the same class waits and measures nothing more."""
    import threading

    import torch

    from engine.intelligent_enhancer import ThroughputCalibrator

    calibrator = ThroughputCalibrator(config.config_dir / "calibration.json", size=16, busy_share=0)
    calibrator.macs_per_second(FAST, "cpu")  # a figure of another class is known
    entered, go = threading.Event(), threading.Event()
    net = torch.nn.Conv2d(3, 3, 3, padding=1).eval()

    def slow_source():  # the user's network: built (here: held until the reads are done) inside the measurement
        entered.set()
        go.wait()
        return net, torch.float32

    first, second, answers = [], [], []
    measuring = threading.Thread(target=lambda: first.append(
        calibrator.macs_per_second("RealESRGAN_x4plus", "cpu", slow_source)))
    measuring.start()
    try:
        assert entered.wait(timeout=60)
        reader = threading.Thread(target=lambda: answers.append(
            (calibrator.cached(FAST, "cpu"), calibrator.cached("RealESRGAN_x4plus", "cpu"),
             len(calibrator.device_rates("cpu")))))
        reader.start()
        reader.join(timeout=60)  # a hang guard: the measurement is held until go is set
        assert answers and answers[0][0] > 0 and answers[0][1:] == (None, 1)  # answered while the run is held
        waiting = threading.Thread(target=lambda: second.append(
            calibrator.macs_per_second("RealESRGAN_x4plus", "cpu")))
        waiting.start()
    finally:
        go.set()
    measuring.join(timeout=60)
    waiting.join(timeout=60)
    assert first and second == first  # the waiter took the figure just measured


# ------------------------------------------------------------------------------------------------ the time limit
def _calibrated(config, rates: dict[str, float]):
    """``config``'s calibration cache holding ``rates`` (MAC/s per model, on the CPU), as calibrations save it."""
    from engine.intelligent_enhancer import ThroughputCalibrator

    path = config.config_dir / "calibration.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({ThroughputCalibrator(path).key(m, "cpu"): r for m, r in rates.items()}))


def test_a_model_not_measured_yet_is_estimated_from_the_fastest_rate_measured_on_this_device(config, model_manager):
    from engine.catalog import CATALOG

    x4plus = "RealESRGAN_x4plus"
    _calibrated(config, {FAST: 40 * GIGA, "realesr-general-x4v3": 10 * GIGA})  # no RRDBNet measured
    advisor = IntelligentEnhancer(model_manager, config, device="cpu")
    assert advisor.calibrator.cached(x4plus, "cpu") is None
    seconds = advisor.cached_estimate_seconds(x4plus, 400, 300)
    network = CATALOG[x4plus].macs_per_pixel * 400 * 300 * 1.1 / (40 * GIGA)  # at the fastest rate, not 10
    assert network < seconds < network * 1.5
    # A real run of another model counts too, under its own key: the faster of the two is taken.
    advisor.timings.add(job_key("cpu", "RealESRGAN_x2plus", "fp32", tiled=False), run(800, 80))
    assert advisor.cached_estimate_seconds(x4plus, 400, 300) < network * 0.6
    assert not model_manager.loaded_models()  # no model ran to estimate


def test_an_app_advice_answers_at_once_with_a_stand_in_rate_and_says_it_is_rough(config, model_manager):
    """The app's advisor (its warm-up calibrates in the background) never measures inside an advice: a first
    automatic request after an install waited ~4 s for two calibrations."""
    from engine.intelligent_enhancer import ThroughputCalibrator

    photo = np.asarray(Image.open(DATA / "advisor" / "OST_009.png").convert("RGB").resize((96, 64)))
    advisor = IntelligentEnhancer(model_manager, config, device="cpu", measure_in_advice=False)
    advice = advisor.advise(photo)
    assert advisor.calibrator.device_rates("cpu") == [] and not (config.config_dir / "calibration.json").exists()
    model = advice.settings.model
    assert any("rough: this model's speed is not measured here yet" in r for r in advice.reasons), advice.reasons
    assert advice.estimated_seconds > 0
    # A rate measured here with another model (the warm-up's device measurement) stands in for an unmeasured class.
    _calibrated(config, {FAST: 40 * GIGA})
    advisor = IntelligentEnhancer(model_manager, config, device="cpu", measure_in_advice=False)
    facts = advisor.machine_facts((model, FAST), measure=False)
    assert facts.macs_per_second == {model: 40 * GIGA, FAST: 40 * GIGA} and facts.rough_rates == {model}
    # The CLI's advisor measures before it answers, as the warm-up does (a tiny calibration, kept whatever the load).
    advisor.calibrator = ThroughputCalibrator(config.config_dir / "calibration.json", size=16, busy_share=0)
    facts = advisor.machine_facts((model, FAST))
    assert facts.rough_rates == frozenset() and advisor.calibrator.cached(model, "cpu") not in (None, 40 * GIGA)
    # A measurement that another job of this process shared (``keep`` says so) is used for the call, not kept.
    shared = ThroughputCalibrator(config.config_dir / "shared.json", size=16, busy_share=0)
    assert shared.macs_per_second(FAST, "cpu", keep=lambda: False) > 0 and shared.cached(FAST, "cpu") is None
    assert not (config.config_dir / "shared.json").exists()


def test_the_time_limit_check_refuses_with_what_to_change_and_measures_only_when_asked(config, model_manager):
    from utils.errors import InputTooLargeError

    from engine.intelligent_enhancer import ThroughputCalibrator

    advisor = IntelligentEnhancer(model_manager, config, device="cpu")
    advisor.calibrator = ThroughputCalibrator(config.config_dir / "calibration.json", busy_share=0)  # kept if busy
    advisor.check_time_limit(FAST, 6000, 6000, 1.0)  # nothing measured on this device: no figure, no refusal
    assert advisor.calibrator.cached(FAST, "cpu") is None
    # Asked to measure, a job that ends within half the limit even at SLOWEST_MACS_PER_SECOND is not: the first
    # request on a fresh install does not wait for a calibration of its model (x4plus's: 1.5-3.7 s here).
    advisor.check_time_limit("RealESRGAN_x4plus", 256, 256, 600.0, calibrate=True)
    assert advisor.calibrator.device_rates("cpu") == []
    with pytest.raises(InputTooLargeError, match="limit of 1 s per job") as refused:
        advisor.check_time_limit(FAST, 6000, 6000, 1.0, calibrate=True)  # measured now (~0.1 s), then refused
    assert advisor.calibrator.cached(FAST, "cpu") is not None
    assert "6000×6000" in str(refused.value) and "REALESRGAN_JOB_TIME_LIMIT_SECONDS" in str(refused.value)
    advisor.check_time_limit(FAST, 16, 16, 600.0)  # within the limit
    advisor.check_time_limit(FAST, 6000, 6000, 0)  # no limit


def test_an_automatic_job_is_refused_from_its_size_when_nothing_the_advisor_may_choose_fits(config, model_manager):
    from utils.errors import InputTooLargeError

    _calibrated(config, {"RealESRGAN_x4plus": 1 * GIGA, "RealESRGAN_x4plus_anime_6B": 1 * GIGA, FAST: 1000 * GIGA})
    advisor = IntelligentEnhancer(model_manager, config, device="cpu")
    with pytest.raises(InputTooLargeError, match="with RealESRGAN_x4plus_anime_6B, the quickest model the advisor "
                                                 "would choose for it,") as refused:
        advisor.check_auto_time_limit(1000, 1000, 60.0)  # anime_6B at 1 GMAC/s: hours
    assert f"Choose a faster model ({FAST} would take about" in str(refused.value)  # it fits: the way out
    advisor.check_auto_time_limit(16, 16, 60.0)  # seconds: within the limit
    advisor.check_auto_time_limit(1000, 1000, None)  # no limit
    with pytest.raises(InputTooLargeError) as refused:
        advisor.check_auto_time_limit(6000, 6000, 1.0)  # nothing here fits: no model to suggest
    assert "Send a smaller image or choose a faster model" in str(refused.value)
    assert not model_manager.loaded_models()  # no model ran, no pixel decoded


def test_an_automatic_job_is_not_refused_up_front_before_anything_was_measured(config, model_manager):
    advisor = IntelligentEnhancer(model_manager, config, device="cpu")
    advisor.check_auto_time_limit(6000, 6000, 1.0)  # no figure: the job measures its model before it runs
    assert advisor.calibrator.cached(FAST, "cpu") is None and not model_manager.loaded_models()


def test_the_fastest_model_is_the_cheapest_super_resolution_network_here(config, model_manager):
    from engine.catalog import CATALOG

    advisor = IntelligentEnhancer(model_manager, config, device="cpu", calibrate=False)
    fastest = advisor.fastest_model()
    available = [s.name for s in model_manager.list_models() if s.available and CATALOG[s.name].kind == "sr"]
    assert fastest in available and fastest.startswith("realesr-animevideov3")
    assert all(CATALOG[fastest].macs_per_pixel <= CATALOG[n].macs_per_pixel for n in available)


def test_a_batch_with_a_time_limit_refuses_an_image_estimated_over_it_before_running_it(tmp_path, config,
                                                                                        model_manager):
    from engine.inference.batch import BatchJob, BatchServices, collect_inputs, run_batch
    from engine.settings import EnhanceSettings

    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (64, 48)).save(src / "a.png")
    Image.new("RGB", (2000, 1500)).save(src / "b.png")
    _calibrated(config, {FAST: 10 * GIGA})  # a slow machine on record: a ~0.5 s, b over 3 minutes
    settings = EnhanceSettings(model=FAST, device="cpu", precision="fp32", quality_metrics=False)
    advisor = IntelligentEnhancer(model_manager, config, device="cpu")
    services = BatchServices(model_manager, config, advisor, time_limit=2.0)
    report = run_batch(collect_inputs([src]), BatchJob(settings=settings, output_dir=tmp_path / "out"), services)
    small, large = report.items
    assert small.ok and not large.ok
    assert "limit of 2 s per job" in large.error and "2000×1500" in large.error
    assert type(large.exception).__name__ == "InputTooLargeError"  # the REST API answers it 413
    assert not (tmp_path / "out" / "b.png").exists()
