"""Tiled inference core: tile maths, blending, parity with the official RealESRGANer, seams, OOM fallback."""

from __future__ import annotations

import contextlib
import io
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import InvalidInputError, InvalidSettingsError, OutOfMemoryError
from engine.upscaler import (
    TileOptions, auto_tile, blend_window, output_is_bad, plan_tiles, prepare_for_inference, upscale_image,
    upscale_image_ex,
)

DATA = Path(__file__).parent / "data" / "upscaler"


@pytest.fixture(scope="module")
def archs():
    from utils.compat import install_torchvision_shim

    install_torchvision_shim()
    from basicsr.archs.rrdbnet_arch import RRDBNet
    from realesrgan.archs.srvgg_arch import SRVGGNetCompact

    return RRDBNet, SRVGGNetCompact


def _srvgg(archs, seed: int = 0) -> torch.nn.Module:
    """A small SRVGG whose border effects reach far (gain-preserving init), so seams are measurable."""
    torch.manual_seed(seed)
    net = archs[1](num_feat=32, num_conv=16).eval()
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, a=0.25)
            torch.nn.init.zeros_(module.bias)
    return net


def _rrdb(archs, scale: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return archs[0](3, 3, scale=scale, num_feat=32, num_block=2, num_grow_ch=16).eval()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """192x192x3 float32 RGB in [0, 1] (crop of Real-ESRGAN's OST_009.png, BSD-3-Clause, see LICENSE)."""
    import cv2

    bgr = cv2.imread(str(DATA / "ost_009_crop192.png"), cv2.IMREAD_COLOR)
    return np.ascontiguousarray(bgr[..., ::-1], dtype=np.float32) / 255.0


def _official(net: torch.nn.Module, rgb: np.ndarray, tmp_path: Path, tile: int, scale: int = 4) -> np.ndarray:
    """RealESRGANer (the reference code) on the same weights; returns HxWx3 float32 RGB in [0, 1]."""
    from realesrgan import RealESRGANer

    weights = tmp_path / "net.pth"
    torch.save({"params": net.state_dict()}, weights)
    upsampler = RealESRGANer(scale=scale, model_path=str(weights), model=_copy(net), tile=tile, tile_pad=10,
                             pre_pad=0, half=False, device="cpu")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints per tile
        out, _ = upsampler.enhance(np.ascontiguousarray(rgb[..., ::-1] * 255.0, dtype=np.float32), outscale=scale)
    return np.ascontiguousarray(out[..., ::-1], dtype=np.float32) / 255.0


def _copy(net: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(net)


def _untiled(net: torch.nn.Module, rgb: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        out = net(torch.from_numpy(rgb).permute(2, 0, 1)[None]).clamp(0, 1)
    return out[0].permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------------------------ tile maths


@pytest.mark.parametrize("height,width,tile,overlap,multiple", [
    (100, 100, 32, 8, 1), (257, 130, 64, 16, 1), (96, 97, 48, 8, 1), (64, 64, 64, 16, 1), (50, 300, 40, 6, 2),
    (128, 128, 32, 4, 4), (33, 1, 16, 4, 1),
])
def test_plan_covers_image_with_equal_tiles_and_enough_overlap(height, width, tile, overlap, multiple):
    plan = plan_tiles(height, width, tile, overlap, multiple)
    covered = np.zeros((height, width), dtype=int)
    for box in plan:
        assert (box.h, box.w) == (plan.tile_h, plan.tile_w)
        assert box.h <= max(tile, 1) + overlap or box.h == height  # a tile reads its stride plus the overlap
        assert box.y % multiple == 0 and box.x % multiple == 0 and box.h % multiple == 0
        assert 0 <= box.y and box.y + box.h <= height and 0 <= box.x and box.x + box.w <= width
        covered[box.y:box.y + box.h, box.x:box.x + box.w] += 1
        top, bottom, left, right = box.overlap
        assert (top == 0) == (box.y == 0) and (bottom == 0) == (box.y + box.h == height)
        assert (left == 0) == (box.x == 0) and (right == 0) == (box.x + box.w == width)
        assert all(o == 0 or o >= overlap for o in box.overlap)
    assert covered.min() >= 1


def test_plan_single_tile_when_tiling_is_off_or_unneeded():
    assert len(plan_tiles(90, 70, 0, 16)) == 1
    plan = plan_tiles(90, 70, 128, 16)
    assert len(plan) == 1 and plan.compute_ratio == 1.0 and plan[0].edges == (True, True, True, True)


def test_plan_uses_the_tile_as_stride_like_realesrganer():
    plan = plan_tiles(256, 256, 128, 16)
    assert (plan.tile_h, len(plan)) == (136, 4)  # 2×2 tiles of 128 + 8 px of shared context
    assert plan.compute_ratio == pytest.approx((2 * 136 / 256) ** 2)
    shrunk = plan_tiles(300, 300, 128, 16)  # 3 per side; equal tiles shrink to limit redundant compute
    assert len(shrunk) == 9 and shrunk.tile_h == 111


@pytest.mark.parametrize("tile,overlap", [(-1, 0), (32, -1), (32, 33), (16, 40)])
def test_plan_rejects_bad_settings(tile, overlap):
    with pytest.raises(InvalidSettingsError):
        plan_tiles(100, 100, tile, overlap)


def test_blend_windows_partition_unity_and_keep_borders():
    plan = plan_tiles(130, 100, 48, 12)
    total = np.zeros((130 * 2, 100 * 2))
    for box in plan:
        window = blend_window(box.h, box.w, box.overlap, 2, box.edges)
        assert window.shape == (box.h * 2, box.w * 2) and window.dtype == np.float32
        assert window.min() >= 0 and window.max() <= 1
        total[box.y * 2:(box.y + box.h) * 2, box.x * 2:(box.x + box.w) * 2] += window
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    border = blend_window(16, 16, 4, 4, (True, True, True, True))
    assert np.all(border == 1.0)
    inner = blend_window(16, 16, 4, 4)
    assert inner[0, 0] == 0 and inner[32, 32] == 1  # dead margin at the border, full weight in the middle


# -------------------------------------------------------------------------------------- inference & parity


def test_untiled_matches_official_realesrganer(archs, photo, tmp_path):
    for net in (_rrdb(archs), _srvgg(archs)):
        rgb = photo[:40, :48]
        ours = upscale_image(prepare_for_inference(net), rgb, TileOptions(scale=4))
        official = _official(net, rgb, tmp_path, tile=0)
        assert ours.shape == (160, 192, 3) and ours.dtype == np.float32
        diff = np.abs(np.round(ours * 255) - np.round(official * 255))
        assert diff.max() <= 1


def test_x2_model_pads_to_even_sizes_and_matches_official(archs, photo, tmp_path):
    net = _rrdb(archs, scale=2)
    rgb = photo[:23, :31]  # odd sizes: reflection-padded to even, cropped back
    ours = upscale_image(net, rgb, TileOptions(scale=2, pad_multiple=2))
    official = _official(net, rgb, tmp_path, tile=0, scale=2)
    assert ours.shape == (46, 62, 3)
    assert np.abs(np.round(ours * 255) - np.round(official * 255)).max() <= 1


@pytest.mark.parametrize("shape,scale,multiple", [((1, 1), 4, 1), ((1, 1), 2, 2), ((3, 5), 1, 4), ((1, 7), 2, 2)])
def test_tiny_images(archs, shape, scale, multiple):
    net = _rrdb(archs, scale=scale)
    image = np.full((*shape, 3), 0.5, dtype=np.float32)
    out = upscale_image(net, image, TileOptions(scale=scale, pad_multiple=multiple, tile=32))
    assert out.shape == (shape[0] * scale, shape[1] * scale, 3)
    assert np.all(np.isfinite(out)) and out.min() >= 0 and out.max() <= 1


def test_tiled_output_without_overlap_effects_equals_untiled_net(archs, photo):
    """A tiny receptive field with a large overlap: tiling must reproduce the untiled output (blending is exact)."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 48, 3, padding=1), torch.nn.PixelShuffle(4)).eval()
    rgb = photo[:70, :90]
    tiled, stats = upscale_image_ex(net, rgb, TileOptions(scale=4, tile=32, overlap=8, batch_size=3))
    assert stats.tiles > 4 and stats.batches == -(-stats.tiles // 3)
    np.testing.assert_allclose(tiled, _untiled(net, rgb), atol=1e-5)


def test_seam_error_three_times_below_official_at_bounded_compute(archs, photo, tmp_path):
    net = _srvgg(archs)
    untiled = _untiled(net, photo)
    tile, overlap = 112, 28
    ours, stats = upscale_image_ex(net, photo, TileOptions(scale=4, tile=tile, overlap=overlap))
    official = _official(net, photo, tmp_path, tile=tile)
    assert stats.tiles == 4 and stats.compute_ratio <= 1.35
    ours_err, official_err = np.abs(ours - untiled), np.abs(official - untiled)
    assert official_err.max() > 0.01  # the official seams are really there
    assert ours_err.mean() * 3 <= official_err.mean()
    assert ours_err.max() * 3 <= official_err.max()


def test_progress_reports_every_batch(archs, photo):
    calls: list[tuple[int, int]] = []
    upscale_image(_srvgg(archs), photo[:64, :64], TileOptions(scale=4, tile=32, overlap=4, batch_size=2),
                  progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 4), (4, 4)]  # 64 px at stride 32: 2×2 tiles, two per batch


@pytest.mark.parametrize("in_flight", [1, 3])
def test_passes_started_ahead_of_the_blending_give_the_same_bands(archs, photo, in_flight):
    """``in_flight`` (1 by default on CUDA: the GPU runs the next batch while the CPU blends this one) starts that
    many forward passes before the oldest one's output is blended, and the output is bit-identical to blending each
    pass at once (the default elsewhere), across tile rows and across two images sharing batches."""
    from engine.upscaler import upscale_images_ex

    net = prepare_for_inference(_srvgg(archs))
    images = [photo[:100, :130], photo[90:190, 60:190]]  # 4x5 tiles each: 14 batches of 3, one shared by both
    events: list[str] = []

    def run_batch(net_, batch):
        events.append("pass")
        return net_(batch)

    def run(ahead):
        events.clear()
        options = TileOptions(scale=4, tile=32, overlap=8, batch_size=3, in_flight=ahead)
        outputs, stats = upscale_images_ex(net, images, options, run_batch=run_batch,
                                           progress=lambda done, total: events.append("blend"))
        return outputs, stats, list(events)

    (at_once, stats, serial), (ahead, ahead_stats, overlapped) = run(0), run(in_flight)
    assert stats.batches == ahead_stats.batches > in_flight + 1
    assert serial == ["pass", "blend"] * stats.batches
    assert overlapped[:in_flight + 2] == ["pass"] * (in_flight + 1) + ["blend"]
    assert overlapped.count("pass") == overlapped.count("blend") == stats.batches
    for want, got in zip(at_once, ahead):
        np.testing.assert_array_equal(got, want)


def test_two_threads_share_one_net(archs, photo):
    net = prepare_for_inference(_srvgg(archs))
    images = [photo[:48, :64], photo[100:164, 50:98]]
    expected = [upscale_image(net, im, TileOptions(scale=4, tile=32, overlap=8)) for im in images]
    results: dict[int, np.ndarray] = {}

    def work(index: int) -> None:
        for _ in range(3):
            results[index] = upscale_image(net, images[index], TileOptions(scale=4, tile=32, overlap=8))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, want in enumerate(expected):
        np.testing.assert_array_equal(results[index], want)


def test_bad_input_rejected(archs):
    net = _srvgg(archs)
    with pytest.raises(InvalidInputError):
        upscale_image(net, np.zeros((8, 8), np.float32), TileOptions(scale=4))
    with pytest.raises(InvalidSettingsError):
        upscale_image(net, np.zeros((8, 8, 3), np.float32), TileOptions(scale=4, batch_size=0))
    with pytest.raises(InvalidSettingsError, match="TileOptions"):
        upscale_image(net, np.zeros((8, 8, 3), np.float32), {"scale": 4})


def test_tile_options_are_validated_on_construction():
    options = TileOptions(scale=np.int64(4), tile=64, overlap=96, device="cpu")
    assert options.device == torch.device("cpu") and type(options.scale) is int
    assert options.overlap == 96  # larger than the tile is allowed: the run clamps it to the tile
    for field, value in (("scale", 0), ("tile", -1), ("overlap", -8), ("batch_size", 0), ("pad_multiple", 0),
                         ("min_tile", 4), ("tile", 32.0), ("batch_size", True), ("in_flight", -1)):
        with pytest.raises(ValueError, match=f"TileOptions.{field} .* must be a whole number"):
            TileOptions(**{"scale": 4, field: value})
    with pytest.raises(InvalidSettingsError, match="TileOptions.device"):
        TileOptions(scale=4, device="gpu")
    with pytest.raises(InvalidSettingsError, match="TileOptions.dtype"):
        TileOptions(scale=4, dtype=torch.int8)
    with pytest.raises(AttributeError):
        options.tile = 0  # frozen


# ------------------------------------------------------------------------------------------ out of memory


def _oom_above(limit: int, seen: list[int], message: str | None = None):
    def run_batch(net, batch):
        seen.append(batch.shape[-1])
        if max(batch.shape[-2:]) > limit:
            if message:
                raise RuntimeError(message)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return net(batch)
    return run_batch


def test_oom_halves_tile_and_matches_clean_run_at_that_tile(archs, photo):
    net = _srvgg(archs)
    rgb = photo[:128, :128]
    seen: list[int] = []
    out, stats = upscale_image_ex(net, rgb, TileOptions(scale=4, tile=0, overlap=8), run_batch=_oom_above(40, seen))
    assert stats.retries == 2 and stats.tile_used == 32  # whole image (128) -> 64 -> 32
    clean, clean_stats = upscale_image_ex(net, rgb, TileOptions(scale=4, tile=32, overlap=8))
    assert clean_stats.tiles == stats.tiles
    np.testing.assert_array_equal(out, clean)


def test_oom_runtime_error_message_is_recognised_and_gives_up_at_min_tile(archs, photo):
    net = _srvgg(archs)
    with pytest.raises(OutOfMemoryError, match="smaller tile"):
        upscale_image_ex(net, photo[:96, :96], TileOptions(scale=4, tile=64, overlap=4, min_tile=32),
                         run_batch=_oom_above(8, [], "DefaultCPUAllocator: not enough memory: you tried... out of "
                                                     "memory"))
    with pytest.raises(RuntimeError, match="unrelated"):  # other errors are not swallowed
        upscale_image_ex(net, photo[:32, :32], TileOptions(scale=4), run_batch=_oom_above(0, [], "unrelated failure"))


# --------------------------------------------------------------------------------------- helpers & prep


def test_output_is_bad():
    good = np.full((4, 4, 3), 0.3, np.float32)
    assert not output_is_bad(good, good)
    assert output_is_bad(np.where(np.eye(4)[..., None] > 0, np.nan, good))
    assert output_is_bad(np.full((4, 4, 3), np.inf, np.float32))
    assert output_is_bad(np.zeros((8, 8, 3), np.float32), good)
    assert not output_is_bad(np.zeros((8, 8, 3), np.float32), np.zeros((2, 2, 3), np.float32))


def test_auto_tile_fits_memory(archs):
    gib = 1 << 30
    assert auto_tile("RRDBNet", 256, 256, free_bytes=16 * gib) == 0
    small = auto_tile("RRDBNet", 2048, 2048, free_bytes=2 * gib)
    assert 0 < small < 2048 and small % 8 == 0
    assert auto_tile("RRDBNet", 2048, 2048, free_bytes=2 * gib, dtype=torch.float16) > small
    assert auto_tile("SRVGGNetCompact", 2048, 2048, free_bytes=2 * gib) > small
    assert auto_tile(_rrdb(archs), 2048, 2048, free_bytes=2 * gib, batch_size=4) < small


def test_the_catalogs_rrdbnet_is_planned_with_its_banded_upsampling_stage():
    """The catalog's RRDBNet upsamples in bands (engine.models.networks), so the memory plan counts a third of what
    a pass holds that runs that stage whole, as spandrel's build of a user's model does; small images are one band.
    Tiles are still sized with the whole-pass figure."""
    import dataclasses

    from engine.catalog import CATALOG
    from engine.inference.planning import activation_arch
    from engine.upscaler import estimate_memory_bytes, pass_memory_bytes

    whole = estimate_memory_bytes("RRDBNet", 256, 256)
    assert whole == 10_700 * 256 * 256 and pass_memory_bytes("RRDBNet", 256, 256) < whole / 2
    assert pass_memory_bytes("RRDBNet", 64, 64) == estimate_memory_bytes("RRDBNet", 64, 64)
    assert pass_memory_bytes("RRDBNet", 256, 256, torch.float16) < pass_memory_bytes("RRDBNet", 256, 256)
    for other in ("ESRGAN", "SRVGGNetCompact", "Unknown"):
        assert pass_memory_bytes(other, 256, 256) == estimate_memory_bytes(other, 256, 256)
    official = CATALOG["RealESRGAN_x4plus"]
    assert activation_arch(official) == "RRDBNet"
    assert activation_arch(dataclasses.replace(official, name="mine", tag="photo")) == "ESRGAN"
    assert activation_arch(CATALOG["realesr-animevideov3"]) == "SRVGGNetCompact"


def test_prepare_for_inference_returns_a_new_faithful_module(archs, photo):
    net = _rrdb(archs)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rgb = photo[:32, :32]
    fp32 = prepare_for_inference(net, "cpu", torch.float32)
    bf16 = prepare_for_inference(net, "cpu", torch.bfloat16)
    assert fp32 is not net and next(bf16.parameters()).dtype == torch.bfloat16
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # original untouched
    ref = _untiled(net, rgb)
    np.testing.assert_allclose(upscale_image(fp32, rgb, TileOptions(scale=4)), ref, atol=1e-5)
    low = upscale_image(bf16, rgb, TileOptions(scale=4, dtype=torch.bfloat16))
    assert 10 * np.log10(1.0 / np.mean((low - ref) ** 2)) > 35
    with pytest.raises(InvalidSettingsError):
        prepare_for_inference(net, "cpu", torch.int8)
    owned = prepare_for_inference(_rrdb(archs), "cpu", torch.float32, in_place=False)
    again = prepare_for_inference(owned, "cpu", torch.bfloat16, in_place=True)  # the model manager's way
    assert again is owned and not owned.training and next(owned.parameters()).dtype == torch.bfloat16
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in owned.parameters() if p.dim() == 4)
    source = {k: v.clone() for k, v in net.state_dict().items()}  # as the tensors of a memory-mapped file
    built = _rrdb(archs)
    built.load_state_dict(source, assign=True)
    prepare_for_inference(built, "cpu", torch.float32, in_place=True)
    assert not {v.data_ptr() for v in source.values()} & {p.data_ptr() for p in built.parameters()}  # unmapped
