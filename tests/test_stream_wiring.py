"""The batch runner plans each input from its header: a job too large for memory is streamed into its TIFF or PNG
file, or
refused (saying what would fit) before any pixel is decoded, and the batch goes on (issue 13)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from engine.inference.memory_plan import MB, JobShape, MemoryPlan, output_mode, streamed
from tests.conftest import ROOT

FAST = "realesr-animevideov3"
SETTINGS = {"model": FAST, "outscale": 2, "tile": 64, "device": "cpu"}


# ------------------------------------------------------------------------------------------------ pure
@pytest.mark.parametrize("fits_memory, fits_streamed, tiff, streamable, expected", [
    (True, True, True, True, "memory"),
    (True, False, False, False, "memory"),
    (False, True, True, True, "stream"),
    (False, True, False, True, "refuse"),  # a JPEG or WebP target cannot be streamed
    (False, True, True, False, "refuse"),  # faces need the output in memory
    (False, False, True, True, "refuse"),
])
def test_output_mode_prefers_memory_then_a_streamed_file(fits_memory, fits_streamed, tiff, streamable, expected):
    assert output_mode(fits_memory, fits_streamed, to_stream_file=tiff, streamable=streamable) == expected


def test_streamed_plan_holds_a_few_bands_of_the_output_instead_of_all_of_it():
    shape = JobShape(width=1000, height=800, channels=3, bit_depth=8, out_width=4000, out_height=3200)
    plan = MemoryPlan(tile=200, base_bytes=800 * MB, input_bytes=10 * MB, network_bytes=50 * MB, band_bytes=60 * MB,
                      output_bytes=4000 * 3200 * 3, metrics_bytes=86 * MB, faces_bytes=0, vram_bytes=0,
                      budget_bytes=940 * MB)
    lean = streamed(plan, shape, scale=4)
    assert (lean.metrics_bytes, lean.faces_bytes) == (0, 0)
    assert lean.output_bytes == 6 * 64 * 4000 * 3  # six bands of 64 output rows
    assert lean.peak_bytes < plan.peak_bytes and not plan.fits and lean.fits
    whole = streamed(plan.__class__(**{**plan.__dict__, "tile": 0}), shape, scale=4)
    assert whole.output_bytes == lean.output_bytes  # untiled too: the engine gives 64-row bands either way
    short = JobShape(width=1000, height=20, channels=1, bit_depth=16, out_width=4000, out_height=80)
    assert streamed(plan, short, scale=4).output_bytes == 6 * 64 * 4000 * 2


@pytest.mark.parametrize("height, scale, out_height, rows", [
    (800, 4, 3200, 64),    # the network's scale: the engine's 64-row bands
    (800, 4, 1600, 64),    # x4 -> x2: 64 output rows per band
    (800, 4, 2400, 66),    # x4 -> x3: rounded up to the period (3 output rows per 4 source rows)
    (801, 4, 3203, 3203),  # a ratio without a short period: one band is the whole output
    (10, 4, 20, 20),       # fewer rows than a band
])
def test_a_streamed_band_is_what_the_resizer_emits(height, scale, out_height, rows):
    from engine.inference.memory_plan import STREAM_CHUNK_ROWS, stream_band_rows
    from engine.upscaler import FINAL_CHUNK_ROWS
    from utils.band_resize import BandResizer

    assert STREAM_CHUNK_ROWS == FINAL_CHUNK_ROWS  # the plan's band is the engine's

    assert stream_band_rows(height, scale, out_height) == rows
    if height * scale != out_height:  # the resizer's own band height
        resizer = BandResizer((8, height * scale), (8, out_height))
        assert min(out_height, resizer.out_step) <= rows


# ------------------------------------------------------------------------------------------------ wiring
def _image(path: Path, width: int, height: int) -> Path:
    rng = np.random.default_rng(width)
    pixels = cv2.GaussianBlur((rng.random((height, width, 3)) * 255).astype(np.uint8), (3, 3), 1)
    Image.fromarray(pixels).save(path)
    return path


def _peaks(path: Path, model_manager, config) -> tuple[int, int]:
    """The planned peaks (bytes) of the job in memory and streamed (tile 64: the tile the plan falls back to)."""
    from engine.inference.pipeline import plan_input
    from engine.settings import EnhanceSettings

    settings = EnhanceSettings(**SETTINGS)
    return (plan_input(path, settings, model_manager, config)[2].peak_bytes,
            plan_input(path, settings, model_manager, config, streamed=True)[2].peak_bytes)


def _between(low: int, high: int) -> float:
    """A budget (MB) strictly between two planned peaks."""
    assert low + 4 * MB < high
    return (low + high) / 2 / MB


def _limited(config, budget_mb: float):
    return config.__class__(**{**config.__dict__, "max_job_memory_mb": budget_mb})


def _cli(tmp_path: Path, weights_dir: Path, budget_mb: float, *args: str) -> subprocess.CompletedProcess:
    from tests.test_model_manager import _clean_env

    env = _clean_env(tmp_path) | {"REALESRGAN_WEIGHTS_DIR": str(weights_dir),
                                  "REALESRGAN_MAX_JOB_MEMORY_MB": f"{budget_mb:.3f}"}
    return subprocess.run([sys.executable, str(ROOT / "main.py"), "enhance", *args, "--model", FAST, "--scale",
                           "2", "--tile", "64", "--device", "cpu", "--json"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)


def test_cli_streams_a_job_too_large_for_memory_into_its_tiff_or_png_identical_to_in_memory(
        model_manager, config, shared_weights_dir, tmp_path):
    from engine.inference.pipeline import enhance_image
    from engine.settings import EnhanceSettings
    from utils.image_io import load_image

    photo = _image(tmp_path / "photo.png", 40, 30)
    in_memory, lean = _peaks(photo, model_manager, config)
    budget = _between(lean, in_memory)  # quality metrics and the output array are left out of the streamed plan
    reference = enhance_image(photo, EnhanceSettings(**SETTINGS), model_manager, config=config).pixels  # no limit
    for name in ("big.tif", "big.png"):
        done = _cli(tmp_path, shared_weights_dir, budget, str(photo), "-o", str(tmp_path / name))
        assert done.returncode == 0, done.stderr[-2000:]
        record = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
        assert record["ok"] is True and any("streamed to disk" in w for w in record["warnings"])
        np.testing.assert_array_equal(load_image(tmp_path / name).pixels, reference)

    refused = _cli(tmp_path, shared_weights_dir, budget, str(photo), "-o", str(tmp_path / "big.webp"))
    assert refused.returncode == 1 and not (tmp_path / "big.webp").exists()
    assert "--format tiff or png" in refused.stderr and "stream it to disk" in refused.stderr


def test_batch_refuses_an_unfittable_input_before_decoding_and_goes_on(model_manager, config, tmp_path):
    from engine.inference.batch import BatchJob, BatchServices, collect_inputs, run_batch
    from engine.settings import EnhanceSettings

    folder = tmp_path / "in"
    folder.mkdir()
    small = _image(folder / "a_small.png", 12, 10)
    big = _image(folder / "b_big.png", 400, 300)  # its output and metrics outgrow the small one's metrics
    small_peak, big_peaks = _peaks(small, model_manager, config)[0], _peaks(big, model_manager, config)
    budget = _between(max(small_peak, big_peaks[1]), big_peaks[0])  # the small fits, the big only streamed
    whole = big.read_bytes()
    middle = len(whole) // 2
    big.write_bytes(whole[:middle] + bytes(64) + whole[middle + 64:])  # decoding it fails; its header still plans it
    services = BatchServices(model_manager, _limited(config, budget))
    job = BatchJob(settings=EnhanceSettings(**SETTINGS), explicit=SETTINGS, output_dir=tmp_path / "out")
    items = collect_inputs([folder])
    report = run_batch(items, job, services)
    assert [item.ok for item in report.items] == [True, False]
    assert (tmp_path / "out" / "a_small.png").exists() and not (tmp_path / "out" / "b_big.png").exists()
    error = report.items[1].error
    assert "memory" in error and "--format tiff or png" in error  # the plan refused it, not the decoder

    big.write_bytes(whole)
    explicit = SETTINGS | {"output_format": "tiff"}
    as_tiff = BatchJob(settings=EnhanceSettings(**explicit), explicit=explicit, output_dir=tmp_path / "tiff")
    report = run_batch(items, as_tiff, services)
    assert [item.ok for item in report.items] == [True, True]
    assert [item.report.get("streamed", False) for item in report.items] == [False, True]
    assert report.items[1].report["output_size"] == [800, 600]
    assert sorted(p.name for p in (tmp_path / "tiff").iterdir()) == ["a_small.tiff", "b_big.tiff"]


def test_a_batch_input_that_fits_only_without_its_neighbours_waits_for_the_previous_save(
        model_manager, config, tmp_path):
    """In a batch the previous result is saved and measured, and the next input decoded, while the network runs
    (memory_plan.overlapped); an input whose plan fits only without those runs once the previous one is saved."""
    from engine.inference import memory_plan
    from engine.inference.batch import BatchJob, BatchServices, _read, collect_inputs, run_batch
    from engine.inference.pipeline import plan_input
    from engine.settings import EnhanceSettings

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        _image(folder / name, 120, 90)
    settings = EnhanceSettings(**SETTINGS)
    plan = plan_input(folder / "a.png", settings, model_manager, config)[2]
    together = memory_plan.overlapped(plan)
    held = plan.output_bytes + max(plan.metrics_bytes, plan.encode_bytes) + 2 * plan.input_bytes
    assert together.held_bytes == held > 0
    assert together.peak_bytes == plan.peak_bytes + together.held_bytes
    services = BatchServices(model_manager, _limited(config, _between(plan.peak_bytes, together.peak_bytes)))
    job = BatchJob(settings=settings, explicit=SETTINGS, output_dir=tmp_path / "out")
    items = collect_inputs([folder])
    assert _read(items[0], job, services, overlapped=True).alone
    assert not _read(items[0], job, services).alone  # one image alone has no neighbours
    assert not _read(items[0], job, BatchServices(model_manager, config), overlapped=True).alone  # room for all
    report = run_batch(items, job, services)
    assert [item.ok for item in report.items] == [True, True, True]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png", "c.png"]


def test_an_auto_job_is_planned_on_the_advice_and_streamed_when_too_large_for_memory(model_manager, config, tmp_path):
    """The advisor needs the decoded pixels, but its choice is planned before the network like explicit settings:
    streamed into a TIFF when only that fits (the advice's reasons kept), refused saying what would fit for a WebP."""
    from engine.inference.batch import BatchJob, BatchServices, collect_inputs, run_batch
    from engine.intelligent_enhancer import IntelligentEnhancer
    from engine.settings import EnhanceSettings

    folder = tmp_path / "in"
    folder.mkdir()
    big = _image(folder / "big.png", 200, 150)
    in_memory, lean = _peaks(big, model_manager, config)
    advisor = IntelligentEnhancer(model_manager=model_manager, config=config, calibrate=False)
    services = BatchServices(model_manager, _limited(config, _between(lean, in_memory)), advisor)
    items = collect_inputs([folder])
    for fmt in ("tiff", "webp"):
        explicit = SETTINGS | {"output_format": fmt}
        job = BatchJob(settings=EnhanceSettings(**explicit), explicit=explicit, auto=True, output_dir=tmp_path / fmt)
        (item,) = run_batch(items, job, services).items
        if fmt == "tiff":
            assert item.ok and item.report["streamed"] is True and item.reasons, item.error
            assert item.report["output_size"] == [400, 300] and (tmp_path / "tiff" / "big.tiff").is_file()
        else:
            assert not item.ok and "--format tiff or png" in item.error and not (tmp_path / "webp").exists()
