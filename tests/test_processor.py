"""enhance_image_direct and process_batch end to end, with the real offline weights on small images."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from engine.errors import CancelledError, InputTooLargeError, InvalidInputError, InvalidSettingsError
from engine.processor import (BatchJob, EnhanceSettings, bleed_transparent_colours, enhance_image_direct, plan_output_size,
                              process_batch, route_model, save_result)
from utils.image_io import load_image

DATA = Path(__file__).resolve().parent / "data"
ROOT = Path(__file__).resolve().parent.parent
FAST = "realesr-animevideov3"  # the small offline model: fast enough for many tests


@pytest.fixture(scope="module")
def manager(model_manager_session):
    return model_manager_session


def crop(path: Path, size: int = 24) -> np.ndarray:
    pixels = load_image(path).pixels
    return np.ascontiguousarray(pixels[:size, :size])


def fast(**kw) -> EnhanceSettings:
    values = dict(model=FAST, tile=0, precision="fp32", device="cpu", quality_metrics=False) | kw
    return EnhanceSettings(**values)


# ------------------------------------------------------------------------------------------------ pure parts
def test_output_size_planning():
    s = EnhanceSettings()
    assert plan_output_size(100, 50, s, 4) == (400, 200, 4.0)
    assert plan_output_size(100, 50, s.replace(outscale=2.5), 4) == (250, 125, 2.5)
    assert plan_output_size(100, 50, s.replace(target_width=300), 4)[:2] == (300, 150)
    assert plan_output_size(100, 50, s.replace(target_height=75), 4)[:2] == (150, 75)
    assert plan_output_size(100, 50, s.replace(max_side=800), 4)[:2] == (800, 400)
    with pytest.raises(InvalidSettingsError, match="between 1× and 8×"):
        plan_output_size(100, 50, s.replace(target_width=2000), 4)


def test_settings_are_validated_with_clear_messages():
    with pytest.raises(InvalidSettingsError, match="'outscale' must be a number from 1 to 8"):
        EnhanceSettings(outscale=9)
    with pytest.raises(InvalidSettingsError, match="'model' must be one of 'auto', 'RealESRGAN_x4plus'"):
        EnhanceSettings(model="nope")
    with pytest.raises(InvalidSettingsError, match="'face_strength'"):
        EnhanceSettings(face_strength=1.5)
    with pytest.raises(InvalidSettingsError, match="only one"):
        EnhanceSettings(target_width=10, max_side=10)
    with pytest.raises(InvalidSettingsError, match="cuda:N"):
        EnhanceSettings(device="gpu")
    assert EnhanceSettings.from_mapping({"outscale": "2", "tile": "128", "junk": 1}, coerce=True).outscale == 2
    assert EnhanceSettings.from_mapping({"tile": 128.0}, coerce=True).tile == 128
    with pytest.raises(InvalidSettingsError, match="'tile'"):
        EnhanceSettings.from_mapping({"tile": "128"})  # text is read only where asked (forms, flags)


def test_auto_routes_native_scale():
    offline = {"RealESRGAN_x4plus"}.__contains__
    assert route_model("auto", 4, offline) == ("RealESRGAN_x4plus", None)
    name, note = route_model("auto", 2, offline)
    assert name == "RealESRGAN_x4plus" and "models download RealESRGAN_x2plus" in note
    assert route_model("auto", 2, {"RealESRGAN_x2plus"}.__contains__)[0] == "RealESRGAN_x2plus"
    assert route_model("RealESRGAN_x4plus_anime_6B", 2, offline)[0] == "RealESRGAN_x4plus_anime_6B"


def test_auto_overlap_follows_the_receptive_field():
    from engine.catalog import CATALOG
    from engine.processor import overlap_for

    rrdb, compact = CATALOG["RealESRGAN_x4plus"], CATALOG["realesr-animevideov3"]
    assert overlap_for(rrdb, 256) == 64 and overlap_for(rrdb, 128) == 32 and overlap_for(rrdb, 32) == 16
    assert overlap_for(compact, 256) == 32 and overlap_for(compact, 64) == 8
    assert EnhanceSettings.from_mapping({"tile_overlap": "24"}, coerce=True).tile_overlap == 24
    with pytest.raises(InvalidSettingsError, match="'tile_overlap'"):
        EnhanceSettings(tile_overlap=-1)


def test_cpu_tiles_for_cache_only_where_they_pay():
    from engine.catalog import CATALOG
    from engine.processor import cpu_cache_tile

    compact, rrdb = CATALOG["realesr-animevideov3"], CATALOG["RealESRGAN_x4plus"]
    assert cpu_cache_tile(compact, 480, 640, 0) == 256
    assert cpu_cache_tile(compact, 480, 640, 128) == 128  # memory wins
    assert cpu_cache_tile(compact, 200, 300, 0) == 0  # small images run whole
    assert cpu_cache_tile(rrdb, 1000, 1000, 0) == 0
    assert cpu_cache_tile(compact, 480, 640, 0, memory_reused=True) == 0  # whole: as fast, no overlap to pay


def test_transparent_pixels_take_the_nearest_visible_colour():
    rgb = np.zeros((4, 4, 3), np.float32)
    rgb[:, :2] = (1.0, 0.5, 0.0)
    alpha = np.zeros((4, 4), np.float32)
    alpha[:, :2] = 1.0
    out = bleed_transparent_colours(rgb, alpha)
    assert np.allclose(out[:, 2:], (1.0, 0.5, 0.0))  # no black left to bleed into the edge
    assert np.array_equal(out[:, :2], rgb[:, :2])  # visible pixels untouched


# ------------------------------------------------------------------------------------------------ with real weights
def test_parity_with_official_realesrganer_untiled(manager, tmp_path):
    """Our engine runs the spandrel-built network; RealESRGANer the basicsr/realesrgan one, on the same file."""
    from utils.compat import install_torchvision_shim

    install_torchvision_shim()
    from realesrgan import RealESRGANer

    from engine.models.loader import reference_network

    image = crop(DATA / "upscaler" / "ost_009_crop192.png", 32)
    for name in ("RealESRGAN_x4plus", FAST):
        ours = enhance_image_direct(image, EnhanceSettings(model=name, tile=0, precision="fp32", device="cpu",
                                                           quality_metrics=False), manager)
        weights, _ = manager.weights_path(name)
        spec = manager.spec(name)
        official = RealESRGANer(scale=4, model_path=str(weights), model=reference_network(spec.arch, spec.arch_params),
                                tile=0, pre_pad=0, half=False, device=torch.device("cpu"))
        reference, _ = official.enhance(image[:, :, ::-1].copy(), outscale=4)  # BGR in, BGR out
        diff = np.abs(ours.pixels.astype(int) - reference[:, :, ::-1].astype(int))
        assert ours.pixels.shape == (128, 128, 3)
        assert diff.max() <= 1, (name, diff.max())


def test_tiled_output_stays_close_to_untiled(manager):
    image = crop(DATA / "upscaler" / "ost_009_crop192.png", 96)
    whole = enhance_image_direct(image, fast(), manager).pixels.astype(int)
    tiled = enhance_image_direct(image, fast().replace(tile=48, tile_overlap=16), manager)
    assert tiled.tile == 48
    diff = np.abs(tiled.pixels.astype(int) - whole)
    assert diff.mean() < 0.5 and diff.max() <= 6


def test_gray_stays_gray_and_16bit_stays_16bit(manager):
    gray = crop(DATA / "advisor" / "00017_gray.png", 20)
    assert gray.shape[2] == 1
    out = enhance_image_direct(gray, fast(), manager)
    assert out.pixels.shape == (80, 80, 1) and out.mode == "L"

    tree = load_image(DATA / "images" / "tree_alpha_16bit_crop.png").pixels
    assert tree.dtype == np.uint16 and tree.shape[2] == 4
    result = enhance_image_direct(tree, fast(outscale=2), manager)
    assert result.pixels.dtype == np.uint16 and result.pixels.shape[2] == 4
    assert result.pixels.shape[:2] == (tree.shape[0] * 2, tree.shape[1] * 2)
    # Transparent stays transparent, opaque stays opaque (alpha went through the model).
    small_alpha = result.pixels[::2, ::2, 3].astype(float) / 65535
    source_alpha = tree[:, :, 3].astype(float) / 65535
    assert np.mean(np.abs(small_alpha - source_alpha)) < 0.08


def test_rgba_edges_get_no_dark_fringe(manager):
    rgba = np.zeros((24, 24, 4), np.uint8)
    rgba[6:18, 6:18] = (240, 40, 40, 255)  # a red square on transparent black
    for mode in ("model", "bicubic"):
        out = enhance_image_direct(rgba, fast(alpha_mode=mode), manager).pixels
        edge = out[:, :, 3] > 64  # visible pixels, edges included
        luminance = out[:, :, :3].astype(float).mean(axis=2)
        assert luminance[edge].min() > 60, mode  # a black fringe would sit near 0


def test_round_trip_keeps_icc_exif_and_applies_orientation(manager, tmp_path):
    base = Image.fromarray(crop(DATA / "upscaler" / "ost_009_crop192.png", 16)[:, :12])  # 16 high, 12 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    exif[0x010F] = "TestCam"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    source = tmp_path / "in.jpg"
    base.save(source, quality=95, exif=exif, icc_profile=icc)
    result = enhance_image_direct(source, fast(), manager)
    assert result.pixels.shape[:2] == (48, 64)  # upright: the 16×12 image turned to 12×16, then ×4
    path, metrics, _ = save_result(result, tmp_path / "out.png", original_bytes=source.stat().st_size)
    with Image.open(path) as written:
        assert written.info.get("icc_profile") == icc
        assert written.getexif().get(0x010F) == "TestCam"
        assert written.getexif().get(0x0112, 1) == 1
    assert metrics["enhanced_size"] == "64x48" and metrics["original_bytes"] == source.stat().st_size
    stripped = enhance_image_direct(source, fast(keep_metadata=False), manager)
    assert stripped.icc_profile is None and stripped.exif is None


def test_tiny_odd_and_non_native_scales(manager):
    one = np.full((1, 1, 3), 128, np.uint8)
    assert enhance_image_direct(one, fast(), manager).pixels.shape == (4, 4, 3)
    odd = crop(DATA / "upscaler" / "ost_009_crop192.png", 13)[:, :7]
    out = enhance_image_direct(odd, fast(outscale=2.5), manager)
    assert out.pixels.shape == (32, 18, 3)
    big = enhance_image_direct(odd, fast(outscale=7, second_pass=True), manager)
    assert big.pixels.shape == (91, 49, 3)
    x2 = enhance_image_direct(odd, fast().replace(model="realesr-animevideov3-x2"), manager)
    assert x2.pixels.shape == (26, 14, 3) and x2.model == "realesr-animevideov3-x2"


def test_output_pixel_limit_and_bad_input_are_clear(manager, config, tmp_path):
    image = np.zeros((40, 40, 3), np.uint8)
    with pytest.raises(InputTooLargeError, match="REALESRGAN_MAX_OUTPUT_PIXELS"):
        enhance_image_direct(image, fast(), manager, config=config.replace(max_output_pixels=1000))
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes((DATA / "images" / "children_alpha_crop.png").read_bytes()[:200])
    with pytest.raises(InvalidInputError):
        enhance_image_direct(corrupt, fast(), manager)
    with pytest.raises(InvalidInputError, match="not found"):
        enhance_image_direct(tmp_path / "missing.png", fast(), manager)


class _FaultyNet(torch.nn.Module):
    """The real network behind a fault: NaN output, or out-of-memory above a tile size."""

    def __init__(self, net, nan: bool = False, oom_above: int | None = None):
        super().__init__()
        self.net, self.nan, self.oom_above, self.calls = net, nan, oom_above, 0

    def forward(self, x):
        self.calls += 1
        if self.oom_above is not None and max(x.shape[-2:]) > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        out = self.net(x)
        return out * float("nan") if self.nan else out


def _inject(manager, name: str, precision: str, **fault):
    """Put a faulty copy of the real cached model under its cache key (and return the key to clean up)."""
    loaded = manager.load_model(name, "cpu", precision)
    key = next(k for k, v in manager._cache.items() if v is loaded)
    manager._cache[key] = dataclasses.replace(loaded, net=_FaultyNet(loaded.net, **fault))
    return key


def test_bf16_is_kept_only_where_it_stays_faithful(manager, native_bf16):
    from engine.inference import precision_check as processor

    image = crop(DATA / "upscaler" / "ost_009_crop192.png", 16)
    assert processor.bf16_psnr(manager, FAST) >= processor.BF16_MIN_PSNR
    fast_mode = enhance_image_direct(image, fast(precision="bf16"), manager)
    assert fast_mode.precision == "bf16" and not fast_mode.warnings
    processor._bf16_verdicts[(FAST, 0.5)] = 31.0  # as if this model lost too much in bf16
    try:
        guarded = enhance_image_direct(image, fast(precision="bf16"), manager)
    finally:
        processor._bf16_verdicts.pop((FAST, 0.5))
    assert guarded.precision == "fp32" and any("not faithful enough" in w for w in guarded.warnings)


def test_bf16_on_a_cpu_without_bf16_instructions_runs_in_fp32_and_says_why(manager, monkeypatch):
    """Emulated bf16 is several times slower than fp32 (169 s against 27 s for x4plus at 256² on an AVX2 CPU): it
    runs in fp32, the result says why, and no bf16 network is loaded for the faithfulness probe either."""
    from engine.inference.pipeline import NO_NATIVE_BF16
    from utils import gpu

    monkeypatch.setattr(gpu, "cpu_has_fast_bf16", lambda: False)
    image = crop(DATA / "upscaler" / "ost_009_crop192.png", 16)
    before = set(manager.loaded_models())
    result = enhance_image_direct(image, fast(precision="bf16"), manager)
    assert result.precision == "fp32" and NO_NATIVE_BF16 in result.warnings
    assert not any(name.endswith("/bf16") for name in set(manager.loaded_models()) - before)
    np.testing.assert_array_equal(result.pixels, enhance_image_direct(image, fast(), manager).pixels)


def test_the_native_bf16_probe_agrees_with_the_cpu_flags():
    from utils.gpu import cpu_has_fast_bf16

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file() or "flags" not in cpuinfo.read_text():
        pytest.skip("no x86 /proc/cpuinfo here")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    assert cpu_has_fast_bf16() == bool(flags & {"avx512_bf16", "amx_tile"})


def test_bad_half_precision_output_is_redone_in_fp32(manager, native_bf16):
    from engine.inference import precision_check as processor

    image = crop(DATA / "upscaler" / "ost_009_crop192.png", 16)
    assert processor.bf16_psnr(manager, FAST, 0.5) >= processor.BF16_MIN_PSNR  # measured on the sound network
    key = _inject(manager, FAST, "bf16", nan=True)
    try:
        result = enhance_image_direct(image, fast(precision="bf16"), manager)
    finally:
        manager._cache.pop(key)
    clean = enhance_image_direct(image, fast(), manager)
    assert result.precision == "fp32"
    assert any("redone in fp32" in w for w in result.warnings)
    assert np.array_equal(result.pixels, clean.pixels)


def test_out_of_memory_halves_the_tile_and_matches_a_clean_run(manager):
    image = crop(DATA / "upscaler" / "ost_009_crop192.png", 96)
    key = _inject(manager, FAST, "fp32", oom_above=60)
    try:
        survived = enhance_image_direct(image, fast(tile=96, tile_overlap=8), manager)
    finally:
        manager._cache.pop(key)
    clean = enhance_image_direct(image, fast(tile=survived.tile, tile_overlap=8), manager)
    assert survived.tile < 96
    assert np.array_equal(survived.pixels, clean.pixels)


def test_cancel_stops_the_job(manager):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        enhance_image_direct(crop(DATA / "upscaler" / "ost_009_crop192.png", 16), fast(), manager, cancel=cancel)


def test_two_threads_at_once_give_the_same_bytes(manager):
    image = crop(DATA / "upscaler" / "ost_009_crop192.png", 48)
    expected = enhance_image_direct(image, fast(tile=32), manager).pixels
    results = [None, None]

    def work(i):
        results[i] = enhance_image_direct(image, fast(tile=32), manager).pixels

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(r, expected) for r in results)


def test_metrics_are_reported(manager, tmp_path):
    image = crop(DATA / "upscaler" / "ost_009_crop192.png", 48)
    result = enhance_image_direct(image, fast().replace(quality_metrics=True), manager)
    m = result.metrics
    assert m["original_size"] == "48x48" and m["enhanced_size"] == "192x192" and m["scale_factor"] == "4.0x"
    assert m["lr_psnr"] > 25
    json.dumps(result.report(), allow_nan=False)


def test_batch_continues_past_a_corrupt_file_and_mirrors_folders(manager, tmp_path, caplog):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(crop(DATA / "upscaler" / "ost_009_crop192.png", 16)).save(src / "a.png")
    Image.fromarray(crop(DATA / "upscaler" / "ost_009_crop192.png", 12)).save(src / "sub" / "b.jpg")
    (src / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (src / "Thumbs.db").write_bytes(b"x")
    (src / ".DS_Store").write_bytes(b"x")
    (src / "notes.txt").write_text("not an image")
    Image.new("P", (4, 4)).save(src / "sub" / "anim.gif")
    seen = []
    job = BatchJob(settings=fast(), output_dir=tmp_path / "out")
    with caplog.at_level("WARNING", logger="engine.inference.batch"):
        report = process_batch([src], job, lambda i, n, name, f: seen.append((i, n)), model_manager=manager,
                               recursive=True)
    left_out = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert left_out == ["2 files in in left out, not a format this app reads (PNG, JPEG, WebP, TIFF, BMP): "
                        "notes.txt, sub/anim.gif"]  # named, so nothing vanishes unsaid; system files unmentioned
    assert report.summary() == "2 successful, 1 failed"
    assert report.failures[0].input.name == "broken.png" and report.failures[0].error
    assert (tmp_path / "out" / "a.png").is_file() and (tmp_path / "out" / "sub" / "b.jpg").is_file()
    assert seen[-1] == (3, 3)
    again = process_batch([src], BatchJob(settings=fast(), output_dir=tmp_path / "out", skip_existing=True),
                          model_manager=manager, recursive=True)
    assert again.skipped == 2 and again.summary() == "0 successful, 1 failed, 2 skipped (output exists)"


def test_output_folder_equal_to_input_folder_never_overwrites_originals(manager, tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    original = src / "a.png"
    Image.fromarray(crop(DATA / "upscaler" / "ost_009_crop192.png", 12)).save(original)
    before = original.read_bytes()
    report = process_batch([src], BatchJob(settings=fast(), output_dir=src), model_manager=manager)
    assert report.summary() == "1 successful, 0 failed"
    assert original.read_bytes() == before
    assert Image.open(src / "a_enhanced.png").size == (48, 48)


def _cli(tmp_path: Path, weights_dir: Path, *args: str,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    from tests.test_model_manager import _clean_env

    env = _clean_env(tmp_path) | {"REALESRGAN_WEIGHTS_DIR": str(weights_dir)} | (env or {})
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)


def test_the_cli_runs_a_catalog_model_without_importing_spandrel_torchvision_or_basicsr(tmp_path):
    """Importing spandrel means all its architectures, torchvision and torch._dynamo (1.5 s and 170 MB per run),
    basicsr much the same: the catalog's own networks (engine.models.networks) need neither, not even on the
    first run, which converts the bundled ncnn weights into a new weights folder."""
    image = tmp_path / "small.png"
    Image.fromarray(crop(DATA / "upscaler" / "ost_009_crop192.png", 16)).save(image)
    for model in (FAST, "RealESRGAN_x4plus"):
        done = _cli(tmp_path, tmp_path / "weights", "enhance", str(image), "-o", str(tmp_path / model), "--model",
                    model, "--tile", "0", env={"PYTHONPROFILEIMPORTTIME": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "import time:" in line}
        assert {"torch", "engine.models.networks", "engine.ncnn_convert"} <= imported
        assert not {"spandrel", "torchvision", "torch._dynamo", "basicsr"} & imported
        assert Image.open(tmp_path / model / "small.png").size == (64, 64)


def test_cli_enhance_json_and_exit_status(manager, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(crop(DATA / "upscaler" / "ost_009_crop192.png", 16)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    done = _cli(tmp_path, manager.weights_dir, "enhance", str(good), str(bad), "-o", str(tmp_path / "out"), "--model", FAST,
                "--tile", "0", "--json")
    assert done.returncode == 1, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    by_name = {Path(r["input"]).name: r for r in lines}
    assert by_name["good.png"]["ok"] is True and by_name["bad.png"]["ok"] is False
    for key in ("input", "output", "model", "scale", "tile", "device", "precision", "seconds", "warnings"):
        assert key in by_name["good.png"]
    assert Image.open(by_name["good.png"]["output"]).size == (64, 64)
    single = _cli(tmp_path, manager.weights_dir, "enhance", str(good), "-o", str(tmp_path / "one.webp"), "--model", FAST, "--scale", "2")
    assert single.returncode == 0, single.stderr[-2000:]
    assert Image.open(tmp_path / "one.webp").size == (32, 32)
    default = _cli(tmp_path, manager.weights_dir, "enhance", str(good), "--model", FAST, "--scale", "2")
    assert default.returncode == 0, default.stderr[-2000:]  # no -o: results/ in the working folder, as the official
    assert Image.open(tmp_path / "results" / "good.png").size == (32, 32)
