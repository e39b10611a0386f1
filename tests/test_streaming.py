"""Streaming inference: bands from the tiled engine, band-wise resizing and conversion, bounded metrics.

Everything is compared with the whole-image computation it replaces: tiles blended into one full-size buffer,
one ``cv2.resize`` of the whole image, metrics on whole float copies.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from engine.inference import pipeline, streaming
from engine.upscaler import FINAL_CHUNK_ROWS, BandStream, TileOptions, blend_window, plan_tiles, upscale_image_ex
from utils.band_resize import BandResizer, resize_rows


def _tiny_srvgg(seed: int = 0) -> torch.nn.Module:
    from engine.models.loader import reference_network

    torch.manual_seed(seed)
    return reference_network("SRVGGNetCompact", dict(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=3, upscale=4,
                                                     act_type="prelu")).eval()


def _whole_buffer_blend(tile_outputs: list[torch.Tensor], height: int, width: int, tile: int, overlap: int,
                        scale: int = 4) -> np.ndarray:
    """The blending the streaming engine replaces: every tile output into one full-size sum and weight map."""
    plan = plan_tiles(height, width, tile, overlap)
    accum = torch.zeros((3, plan.height * scale, plan.width * scale))
    weights = torch.zeros((1, plan.height * scale, plan.width * scale))
    windows = [torch.from_numpy(blend_window(b.h, b.w, b.overlap, scale, b.edges)) for b in plan]
    for box, window in zip(plan, windows):
        weights[0, box.y * scale:(box.y + box.h) * scale, box.x * scale:(box.x + box.w) * scale].add_(window)
    for box, window, out in zip(plan, windows, tile_outputs):
        accum[:, box.y * scale:(box.y + box.h) * scale, box.x * scale:(box.x + box.w) * scale].addcmul_(out, window)
    accum.div_(weights.clamp_min_(1e-12))
    return accum.clamp(0, 1).permute(1, 2, 0).numpy()


def _recording(outputs: list):
    def run(net, batch):
        out = net(batch)
        outputs.extend(out.float().clone())
        return out
    return run


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(7)
    base = cv2.GaussianBlur(rng.random((75, 93, 3), dtype=np.float32), (0, 0), 1.5)
    return np.ascontiguousarray(np.clip(base * 1.4 - 0.2, 0, 1), dtype=np.float32)


def test_bands_are_bit_identical_to_whole_buffer_blending_and_one_tile_row_high(image):
    net, tiles = _tiny_srvgg(), []
    stream = BandStream(net, [image], TileOptions(scale=4, tile=24, overlap=6), run_batch=_recording(tiles))
    out = np.full((image.shape[0] * 4, image.shape[1] * 4, 3), -1.0, np.float32)
    next_row, tallest = 0, 0
    for n, top, rows in stream:
        assert n == 0 and top == next_row  # in order, no gap, no overlap
        out[top:top + rows.shape[0]] = rows
        next_row, tallest = top + rows.shape[0], max(tallest, rows.shape[0])
    assert next_row == out.shape[0]
    assert tallest <= FINAL_CHUNK_ROWS < (24 + 6) * 4  # bands are smaller than a tile row: copies stay small
    np.testing.assert_array_equal(out, _whole_buffer_blend(tiles, 75, 93, 24, 6))
    assert stream.stats.tiles == len(plan_tiles(75, 93, 24, 6))


def test_one_tile_gives_the_network_output_in_bounded_bands(image):
    net = _tiny_srvgg()
    stream = BandStream(net, [image], TileOptions(scale=4, tile=0))
    bands = list(stream)
    assert [top for _, top, _ in bands] == list(range(0, 300, FINAL_CHUNK_ROWS))
    assert max(rows.shape[0] for _, _, rows in bands) == FINAL_CHUNK_ROWS
    with torch.inference_mode():
        whole = net(torch.from_numpy(image).permute(2, 0, 1)[None]).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(np.concatenate([rows for _, _, rows in bands]), whole, atol=1e-6)


def test_two_images_share_forward_calls_and_get_their_own_bands(image):
    net = _tiny_srvgg()
    flipped = np.ascontiguousarray(image[::-1])
    stream = BandStream(net, [image, flipped], TileOptions(scale=4, tile=32, overlap=8, batch_size=3))
    outs = [np.zeros((300, 372, 3), np.float32) for _ in range(2)]
    for n, top, rows in stream:
        outs[n][top:top + rows.shape[0]] = rows
    for got, src in zip(outs, (image, flipped)):
        alone, _ = upscale_image_ex(net, src, TileOptions(scale=4, tile=32, overlap=8))
        np.testing.assert_allclose(got, alone, atol=1e-5)  # batched convolutions may sum in another order


def _rrdb_x2() -> torch.nn.Module:
    """A tiny RRDBNet x2: it unshuffles 2x2 blocks, so its input is padded to even sizes."""
    from engine.models.loader import reference_network

    torch.manual_seed(3)
    return reference_network("RRDBNet", dict(num_in_ch=3, num_out_ch=3, scale=2, num_feat=8, num_block=1,
                                             num_grow_ch=4)).eval()


@pytest.mark.parametrize("dtype,channels,tile", [
    (np.uint8, 3, 24), (np.uint16, 3, 24), (np.uint8, 1, 24), (np.uint16, 1, 0), (np.uint8, 3, 0)])
def test_8_and_16_bit_pixels_are_read_tile_by_tile_with_the_values_of_a_whole_float_copy(dtype, channels, tile):
    """The engine converts each tile it reads (no float copy of the whole image): the result is bit-identical to
    converting the whole image first (gray read as three equal channels), tiled or not, and with a pad multiple."""
    rng = np.random.default_rng(5)
    top = np.iinfo(dtype).max
    pixels = rng.integers(0, top + 1, (75, 93, channels), dtype=dtype)
    floats = pipeline.as_float(pixels)
    floats = np.ascontiguousarray(np.repeat(floats, 3, axis=2) if channels == 1 else floats)
    for net, options in ((_tiny_srvgg(), TileOptions(scale=4, tile=tile, overlap=6)),
                         (_rrdb_x2(), TileOptions(scale=2, tile=tile, overlap=6, pad_multiple=2))):
        got, stats = upscale_image_ex(net, pixels, options)
        want, _ = upscale_image_ex(net, floats, options)
        np.testing.assert_array_equal(got, want)
        assert (stats.tiles > 1) == bool(tile)


def test_a_source_of_another_type_is_refused_with_what_to_give(image):
    from engine.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="float32 in \\[0, 1\\], uint8 or uint16"):
        list(BandStream(_tiny_srvgg(), [image.astype(np.float64)], TileOptions(scale=4)))
    with pytest.raises(InvalidInputError, match="HxWx1 gray"):
        list(BandStream(_tiny_srvgg(), [np.zeros((8, 8, 2), np.uint8)], TileOptions(scale=4)))


@pytest.mark.parametrize("src,dst", [
    ((400, 280), (200, 140)),   # x4 network, x2 asked: area, ratio 2
    ((400, 280), (300, 210)),   # x3 asked: area, ratio 4/3
    ((100, 70), (200, 140)),    # Lanczos up
    ((160, 120), (117, 87)),    # an odd target size: ratio 40/29
    ((160, 120), (333, 251)),   # Lanczos, ratio 120/251 (bands as tall as the period)
    ((160, 120), (80, 120)),    # only the width changes
])
def test_band_resizer_equals_one_whole_image_resize(src, dst):
    rng = np.random.default_rng(1)
    whole_src = rng.random((src[1], src[0], 3), dtype=np.float32)
    whole = pipeline.resize_float(whole_src, *dst)
    resizer = BandResizer(src, dst, band_rows=16)
    out = np.full((dst[1], dst[0], 3), -1.0, np.float32)
    top = 0
    while top < src[1]:  # rows arrive in uneven bands, as tile rows do
        step = int(rng.integers(1, 40))
        for first, rows in resizer.push(whole_src[top:top + step]):
            out[first:first + rows.shape[0]] = np.clip(rows, 0, 1)
        top += step
    for first, rows in resizer.finish():
        out[first:first + rows.shape[0]] = np.clip(rows, 0, 1)
    np.testing.assert_array_equal(out, whole)


def test_resize_rows_gives_rows_of_the_whole_resize():
    src = np.random.default_rng(2).random((90, 70, 3), dtype=np.float32)
    whole = cv2.resize(src, (213, 271), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(resize_rows(src, (213, 271), 100, 77, cv2.INTER_CUBIC), whole[100:177])


@pytest.mark.parametrize("channels,dtype", [(3, np.uint8), (4, np.uint8), (1, np.uint8), (2, np.uint16),
                                            (3, np.uint16)])
def test_canvas_writes_what_the_whole_image_conversion_gives(channels, dtype):
    rng = np.random.default_rng(3)
    colour = rng.random((120, 160, 3), dtype=np.float32)
    alpha = rng.random((120, 160, 3), dtype=np.float32)
    canvas = streaming.OutputCanvas((90, 70), channels, dtype)
    for source, writer in ((colour, canvas.colour_writer((160, 120))),) + (
            ((alpha, canvas.alpha_writer((160, 120))),) if channels in (2, 4) else ()):
        for top in range(0, 120, 50):
            writer(0, top, source[top:top + 50])
        writer.close()
    want_colour = pipeline.resize_float(colour, 90, 70)
    if channels in (1, 2):
        want_colour = cv2.cvtColor(want_colour, cv2.COLOR_RGB2GRAY)[:, :, None]
    parts = [want_colour] + ([pipeline.resize_float(alpha, 90, 70).mean(axis=2)[:, :, None]]
                             if channels in (2, 4) else [])
    np.testing.assert_array_equal(canvas.pixels, pipeline.from_float(np.concatenate(parts, axis=2), dtype))


def test_bounded_metrics_equal_the_whole_image_ones():
    from utils import metrics

    rng = np.random.default_rng(4)
    small = (cv2.GaussianBlur(rng.random((610, 230, 3)), (0, 0), 2) * 255).astype(np.uint8)  # 3 metric bands
    big = cv2.resize(small, (920, 2440), interpolation=cv2.INTER_LANCZOS4)  # > NIQE's 768 crop
    whole_back = metrics._shrink_to(metrics._to_float255(big), small.shape[:2])
    bands = list(metrics._shrunk_rows(big, small.shape[:2]))
    assert len(bands) > 1
    np.testing.assert_array_equal(np.concatenate([rows for _, rows in bands]), whole_back)

    lr, orig_crop, back_crop = metrics._compare_bands(small, big, 300)
    assert lr == metrics._lr_consistency_float(metrics._to_float255(small), whole_back)  # the same sums, exactly
    np.testing.assert_array_equal(orig_crop, metrics._centre_crop(metrics._to_float255(small), 300))
    np.testing.assert_array_equal(back_crop, metrics._centre_crop(whole_back, 300))

    got = metrics.quality_metrics(small, big)
    assert (got["lr_psnr"], got["lr_ssim"]) == (lr["psnr"], lr["ssim"])
    assert got["niqe_output"] == pytest.approx(metrics.niqe(big), abs=0)  # the same centre crop
    assert got["niqe_input"] is not None and got["lr_psnr"] > 30


def test_quality_metrics_hold_bands_not_the_input_as_float():
    """The input and the output shrunk back to it are compared band by band: a tall image's metrics take less
    than its two whole float copies (the code before held both: 164 MB here)."""
    import tracemalloc

    from utils import metrics

    small = np.random.default_rng(5).integers(0, 256, (12000, 400, 3), dtype=np.uint8)
    big = cv2.resize(small, (800, 24000), interpolation=cv2.INTER_NEAREST)
    whole_floats = small.size * 4 * 2  # float32 input and shrunk output: 115 MB
    tracemalloc.start()
    try:
        got = metrics.quality_metrics(small, big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got["lr_psnr"] == metrics.PSNR_CAP_DB  # nearest x2 shrinks back to the input exactly
    assert peak < whole_floats / 1.5, f"{peak / 1e6:.0f} MB"  # 59 MB: bands, the NIQE crops


@pytest.mark.parametrize("suffix", [".tiff", ".png"])
@pytest.mark.parametrize("kind", ["rgb8", "gray8", "rgb16"])
def test_streamed_file_decodes_identical_to_the_in_memory_output(kind, suffix, model_manager, config, tmp_path):
    from engine.settings import EnhanceSettings
    from utils.image_io import load_image

    rng = np.random.default_rng(5)
    pixels = cv2.GaussianBlur((rng.random((29, 35, 3)) * 255).astype(np.uint8), (3, 3), 1)
    pixels = {"rgb8": pixels, "gray8": pixels[:, :, :1], "rgb16": pixels.astype(np.uint16) * 257 + 1}[kind]
    settings = EnhanceSettings(model="realesr-animevideov3", outscale=3, tile=16, quality_metrics=False)
    in_memory = pipeline.enhance_image(pixels, settings, model_manager, config=config).pixels
    saved, report = pipeline.enhance_streamed(pixels, settings, model_manager, tmp_path / f"out{suffix}",
                                              config=config)
    assert report["output_size"] == [105, 87] and saved.bit_depth == 8 * pixels.dtype.itemsize
    np.testing.assert_array_equal(load_image(saved.path).pixels, in_memory)
    assert [p.name for p in tmp_path.iterdir()] == [f"out{suffix}"]  # no temporary file left


@pytest.mark.parametrize("fmt", ["png", "tiff"])
@pytest.mark.parametrize("channels, dtype", [(1, np.uint8), (2, np.uint8), (3, np.uint8), (4, np.uint8),
                                             (1, np.uint16), (3, np.uint16), (4, np.uint16)])
def test_rows_written_in_blocks_decode_to_the_whole_image(fmt, channels, dtype, tmp_path):
    """save_rows gets blocks of uneven heights (as the bands come) and writes a file equal to the whole image."""
    from utils.image_io import load_image, save_rows

    rng = np.random.default_rng(channels)
    top = 65535 if dtype == np.uint16 else 255
    image = (rng.random((101, 37, channels)) * top).astype(dtype)
    image[40:60] = image[39:40]  # runs of equal rows: the PNG filter's difference to the row above is zero
    blocks = [image[a:b] for a, b in ((0, 1), (1, 30), (30, 94), (94, 101))]
    saved = save_rows(iter(blocks), tmp_path / f"out.{fmt}", fmt, size=(37, 101), channels=channels, dtype=dtype)
    assert saved.format == fmt and saved.bit_depth == 8 * np.dtype(dtype).itemsize
    decoded = load_image(saved.path).pixels
    np.testing.assert_array_equal(decoded.reshape(image.shape), image)
    if fmt == "png":
        Image.open(saved.path).verify()  # every chunk's CRC


def test_a_streamed_png_keeps_the_icc_profile_and_a_short_stream_leaves_no_file(tmp_path):
    from PIL import ImageCms

    from utils.errors import InvalidInputError
    from utils.image_io import save_rows

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    image = np.zeros((8, 5, 3), np.uint8)
    save_rows([image], tmp_path / "a.png", "png", size=(5, 8), channels=3, dtype=np.uint8, icc_profile=icc)
    assert Image.open(tmp_path / "a.png").info["icc_profile"] == icc
    with pytest.raises(InvalidInputError, match="7 rows, expected 8"):
        save_rows([image[:7]], tmp_path / "b.png", "png", size=(5, 8), channels=3, dtype=np.uint8)
    with pytest.raises(InvalidInputError, match="TIFF or PNG"):
        save_rows([image], tmp_path / "c.jpg", "jpg", size=(5, 8), channels=3, dtype=np.uint8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
