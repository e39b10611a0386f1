"""Memory: the streaming path's peak under an address-space cap, the memory plan, and refusing what cannot fit.

The peak-memory test runs in a subprocess capped with ``RLIMIT_AS``, so a regression fails cleanly (the child
gets a MemoryError) instead of taking the machine down. It asserts allocation success or failure, never a timing.
"""

from __future__ import annotations

import io
from pathlib import Path
import subprocess
import sys
import textwrap

import httpx
import numpy as np
import pytest

from tests.conftest import ROOT, serve_app

MB = 2 ** 20

# A x4 of a 1500x1000 image with a tiny random-weight compact model, in a child capped at its address space after
# setup + CAP. The old engine held the output as float32 at x4 twice (sums and result, 288 MB each) plus a 96 MB
# weight map; the streaming path holds the uint8 output (72 MB) and one tile row of float buffers.
_CHILD = textwrap.dedent("""
    import resource, sys
    import numpy as np, torch
    torch.set_num_threads(1)  # no extra thread arenas in the address space
    from engine.models.loader import reference_network
    from engine.upscaler import BandStream, TileOptions
    from engine.inference.streaming import OutputCanvas

    torch.manual_seed(0)
    net = reference_network("SRVGGNetCompact", dict(num_in_ch=3, num_out_ch=3, num_feat=4, num_conv=1, upscale=4,
                                                    act_type="prelu")).eval()
    image = np.random.default_rng(0).random((1000, 1500, 3), dtype=np.float32)
    options = TileOptions(scale=4, tile=120, overlap=8)
    BandStream(net, [image[:64, :64]], options)  # warm up: libraries loaded before the cap
    for _ in BandStream(net, [image[:64, :64]], options):
        pass
    with open("/proc/self/status") as status:
        vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    cap = vm + int(sys.argv[2]) * 2 ** 20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        if sys.argv[1] == "stream":
            canvas = OutputCanvas((6000, 4000), 3, np.uint8)
            writer = canvas.colour_writer((6000, 4000))
            for band in BandStream(net, [image], options):
                writer(*band)
            writer.close()
            assert canvas.pixels.shape == (4000, 6000, 3)
        else:  # the buffers the old engine allocated: float32 sums and weights at x4, and the float result
            accum, weights = torch.zeros((1, 3, 4000, 6000)), torch.zeros((1, 4000, 6000))
            result = np.empty((4000, 6000, 3), np.float32)
    except (MemoryError, RuntimeError) as error:
        if "memory" not in str(error).lower() and not isinstance(error, MemoryError):
            raise
        print("out of memory", error)
        sys.exit(3)
    print("ok")
""")
CAP_MB = 400


def _child(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CHILD, mode, str(CAP_MB)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})


def test_x4_of_1500x1000_streams_under_a_cap_the_old_engine_s_buffers_exceed():
    streamed = _child("stream")
    assert streamed.returncode == 0 and "ok" in streamed.stdout, streamed.stdout + streamed.stderr[-2000:]
    old = _child("old")  # the cap binds: the old engine's whole-size float buffers (672 MB) do not fit in it
    assert old.returncode == 3, old.stdout + old.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ the plan
def test_plan_grows_with_the_output_and_counts_each_part():
    from engine.inference.memory_plan import (
        CUDA_LIBRARIES_BYTES, FACE_NETWORK_BYTES, INPUT_BYTES_PER_PIXEL_FLOAT, JobShape, NetworkRun, plan_memory)

    run = NetworkRun(scale=4, tile=128, overlap=16, activation_bytes=50 * MB, weights_bytes=2 * MB)
    small = plan_memory(JobShape(1000, 800, 3, 8, 4000, 3200), run, (8 << 30, 0))
    wide = plan_memory(JobShape(2000, 800, 3, 8, 8000, 3200), run, (8 << 30, 0))
    assert wide.output_bytes == 2 * small.output_bytes == 2 * 4000 * 3200 * 3
    assert wide.band_bytes == 2 * small.band_bytes  # a band spans the width
    # the quality metrics run after the network, in the memory its activations and bands held
    assert small.peak_bytes == sum(getattr(small, f"{p}_bytes") for p in ("base", "input", "output", "faces")) + max(
        small.network_bytes + small.band_bytes, small.metrics_bytes)
    lean = plan_memory(JobShape(1000, 800, 3, 8, 4000, 3200), run, (8 << 30, 0), quality_metrics=False)
    assert small.metrics_bytes > 0 and lean.metrics_bytes == 0
    assert small.peak_bytes - lean.peak_bytes == max(0, small.metrics_bytes - small.network_bytes - small.band_bytes)
    tiny_network = NetworkRun(scale=4, tile=32, overlap=8, activation_bytes=MB, weights_bytes=2 * MB)
    measured = plan_memory(JobShape(1000, 800, 3, 8, 4000, 3200), tiny_network, (8 << 30, 0))
    assert measured.metrics_bytes > measured.network_bytes + measured.band_bytes  # then the metrics set the peak
    assert measured.peak_bytes == sum(getattr(measured, f"{p}_bytes") for p in (
        "base", "input", "output", "faces", "metrics"))
    deep = plan_memory(JobShape(1000, 800, 3, 16, 4000, 3200), run, (8 << 30, 0))
    assert deep.output_bytes == 2 * small.output_bytes
    # no float copy of the input (the engine converts each tile as it reads it), except with alpha (bled colours)
    assert small.input_bytes == 1000 * 800 * 3 and deep.input_bytes == 1000 * 800 * 6
    alpha = plan_memory(JobShape(1000, 800, 4, 8, 4000, 3200), run, (8 << 30, 0))
    assert alpha.input_bytes == 1000 * 800 * (4 + INPUT_BYTES_PER_PIXEL_FLOAT)
    # faces are pasted in place: the face network, plus an 8-bit RGB copy for outputs that are not 8-bit RGB
    faces = plan_memory(JobShape(1000, 800, 3, 8, 4000, 3200), run, (8 << 30, 0), face_enhance=True)
    deep_faces = plan_memory(JobShape(1000, 800, 3, 16, 4000, 3200), run, (8 << 30, 0), face_enhance=True)
    assert faces.faces_bytes == FACE_NETWORK_BYTES and small.faces_bytes == 0
    assert deep_faces.faces_bytes == FACE_NETWORK_BYTES + 4000 * 3200 * (3 + 12)
    assert small.fits and not plan_memory(JobShape(1000, 800, 3, 8, 4000, 3200), run, (small.peak_bytes - 1, 0)).fits
    gpu = plan_memory(JobShape(1000, 800, 3, 8, 4000, 3200),
                      NetworkRun(4, 128, 16, 50 * MB, 2 * MB, device_type="cuda"), (8 << 30, 40 * MB))
    assert gpu.vram_bytes > 40 * MB and not gpu.fits  # activations are checked against VRAM
    # a process that handed the CUDA libraries' pages back (no CUDA here) has a smaller base, nothing else changes
    released = plan_memory(JobShape(1000, 800, 3, 8, 4000, 3200), run, (8 << 30, 0), cuda_libraries_released=True)
    assert small.base_bytes - released.base_bytes == CUDA_LIBRARIES_BYTES
    assert small.peak_bytes - released.peak_bytes == CUDA_LIBRARIES_BYTES


def test_plan_counts_encoding_the_output_after_the_metrics():
    from engine.inference import memory_plan
    from engine.inference.memory_plan import JobShape, NetworkRun, plan_memory
    from utils.image_io import encoding_bytes

    run = NetworkRun(scale=4, tile=128, overlap=16, activation_bytes=10 * MB, weights_bytes=2 * MB)
    plans = {fmt: plan_memory(JobShape(1000, 800, 3, 8, 4000, 3200, fmt), run, (8 << 30, 0))
             for fmt in ("", "png", "jpg", "webp")}
    assert plans[""].encode_bytes == 0
    # PNG and JPEG hold their encoded bytes (compressed row by row from the pixels the engine lends them)
    assert plans["png"].encode_bytes == plans["jpg"].encode_bytes == 4000 * 3200 < plans["webp"].encode_bytes
    # WebP holds libwebp's YUV planes; its lossless alpha encoder far more
    assert plans["webp"].encode_bytes == encoding_bytes(4000, 3200, 3, 8, "webp") == 2 * 4000 * 3200
    rgba = JobShape(1000, 800, 4, 8, 4000, 3200, "webp")
    webp = plan_memory(rgba, run, (8 << 30, 0))
    assert webp.encode_bytes == encoding_bytes(4000, 3200, 4, 8, "webp") == 27 * 4000 * 3200
    assert webp.encode_bytes > max(webp.network_bytes + webp.band_bytes, webp.metrics_bytes)  # then it sets the peak
    assert webp.peak_bytes == sum(getattr(webp, f"{p}_bytes") for p in ("base", "input", "output", "encode"))
    assert plans["png"].peak_bytes == plans[""].peak_bytes  # under the network's share: no change
    assert "encoding after the metrics" in webp.describe() and webp.as_dict()["parts_mb"]["encode"] > 0
    # streamed into a file in strips: nothing is encoded whole
    assert memory_plan.streamed(webp, rgba, 4).encode_bytes == 0
    # a batch's previous image is measured, then encoded, while this network runs: the larger of the two
    assert memory_plan.overlapped(webp).held_bytes == webp.output_bytes + webp.encode_bytes + 2 * webp.input_bytes
    # 16-bit or transparent pixels are first copied to 8 bits or flattened for the lossy formats
    assert encoding_bytes(100, 100, 4, 16, "jpg") == 100 * 100 * (5 + 4)
    assert encoding_bytes(100, 100, 1, 8, "jpg") == encoding_bytes(100, 100, 1, 16, "png") == 100 * 100


def test_the_output_format_the_job_writes_is_planned(config, model_manager):
    """The plan of a job follows the format its output is encoded in: "auto" keeps a WebP input's format (a PNG
    when its alpha is too large to compress within the goal), an explicit format wins, a batch's output file decides
    by its extension."""
    from PIL import Image

    from engine.inference.batch import BatchJob, settings_for
    from engine.inference.pipeline import plan_input, plan_job
    from engine.settings import EnhanceSettings

    buf = io.BytesIO()
    Image.new("RGBA", (1000, 1000)).save(buf, "WEBP", quality=5)
    settings = EnhanceSettings(model="realesr-animevideov3", outscale=4, device="cpu")
    webp = plan_input(buf.getvalue(), settings, model_manager, config)[2]
    png = plan_input(buf.getvalue(), settings.replace(output_format="png"), model_manager, config)[2]
    assert webp.encode_bytes == 27 * 4000 * 4000 and png.encode_bytes == 4000 * 4000
    assert webp.peak_bytes > png.peak_bytes  # libwebp's alpha encoder (0.4 GB) outweighs the network's share
    # 4100² is over 4096²: "auto" writes a PNG and says why; an explicit WebP stores its alpha uncompressed
    big = dict(channels=4, input_format="WEBP")
    job, _size, notes = plan_job(settings.replace(outscale=4.1), (1000, 1000), model_manager, config, **big)
    assert job.memory.encode_bytes == 4100 * 4100 and any("saved as PNG" in n for n in notes), notes
    job, _size, notes = plan_job(settings.replace(outscale=4.1, output_format="webp"), (1000, 1000),
                                 model_manager, config, **big)
    assert job.memory.encode_bytes == 4 * 4100 * 4100 and not any("saved as PNG" in n for n in notes)
    job = BatchJob(settings=settings.replace(output_format="png"), explicit={}, output_file=Path("out.webp"))
    assert settings_for(None, job, None)[0].output_format == "webp"


def test_an_output_its_format_cannot_hold_is_refused_before_any_work(config, model_manager):
    """WebP holds 16383 pixels a side: a 5000-pixel-wide WebP at x4 asked for as WebP is refused from its header,
    with what to do; with the automatic format the plan writes it as PNG."""
    from PIL import Image

    from engine.inference.pipeline import plan_input
    from engine.settings import EnhanceSettings
    from utils.errors import InvalidSettingsError

    buf = io.BytesIO()
    Image.new("RGB", (5000, 100)).save(buf, "WEBP", quality=5)
    settings = EnhanceSettings(model="realesr-animevideov3", outscale=4, device="cpu", output_format="webp")
    with pytest.raises(InvalidSettingsError, match="16383 pixels a side.*20000×400.*PNG or TIFF"):
        plan_input(buf.getvalue(), settings, model_manager, config)
    _model, size, auto = plan_input(buf.getvalue(), settings.replace(output_format="auto"), model_manager, config)
    assert size == (20000, 400) and auto.encode_bytes == 20000 * 400  # PNG's 1 byte a pixel, not WebP's 8


def test_the_plan_counts_the_networks_a_long_lived_app_keeps_loaded(config, model_manager):
    """A server that ran other models keeps them loaded, and its budget counts what the process holds: a job's peak
    counts them too, but not the job's own model (in the runtime) nor networks nobody loaded."""
    from PIL import Image

    from engine.inference.pipeline import plan_input
    from engine.settings import EnhanceSettings

    buf = io.BytesIO()
    Image.new("RGB", (200, 150)).save(buf, "PNG")
    settings = EnhanceSettings(model="realesr-animevideov3", outscale=2, device="cpu", precision="fp32", tile=0)
    alone = plan_input(buf.getvalue(), settings, model_manager, config)[2]
    model_manager.load_model("realesr-animevideov3", "cpu", "fp32", allow_download=False)
    assert plan_input(buf.getvalue(), settings, model_manager, config)[2].resident_bytes == alone.resident_bytes == 0
    other = model_manager.load_model("realesr-animevideov3-x2", "cpu", "fp32", allow_download=False).net
    other_bytes = sum(t.numel() * t.element_size() for t in [*other.parameters(), *other.buffers()])
    held = plan_input(buf.getvalue(), settings, model_manager, config)[2]
    assert held.resident_bytes == other_bytes > 2_000_000
    assert held.peak_bytes == alone.peak_bytes + other_bytes
    assert "the app's other models, server and uploads 2 MB" in held.describe()
    assert held.as_dict()["parts_mb"]["resident"] > 2
    with model_manager.holding(40 << 20):  # a server's upload kept in memory for its job
        uploaded = plan_input(buf.getvalue(), settings, model_manager, config)[2]
        with model_manager.holding(10 << 20), pytest.raises(RuntimeError):  # a job that fails gives its share back
            assert plan_input(buf.getvalue(), settings, model_manager, config)[2].resident_bytes == \
                other_bytes + (50 << 20)
            raise RuntimeError("the job failed")
    assert uploaded.peak_bytes == held.peak_bytes + (40 << 20)
    assert plan_input(buf.getvalue(), settings, model_manager, config)[2].resident_bytes == other_bytes


def test_the_web_app_s_model_manager_plans_the_server_s_own_memory(tmp_path, shared_weights_dir):
    """The app's services build a model manager that counts the web server (Gradio, FastAPI) in every plan."""
    from PIL import Image

    from engine.inference.memory_plan import APP_RUNTIME_BYTES
    from engine.inference.pipeline import plan_input
    from engine.settings import EnhanceSettings
    from tests.conftest import app_config
    from ui.services import create_services

    services = create_services(app_config(tmp_path, shared_weights_dir))
    buf = io.BytesIO()
    Image.new("RGB", (200, 150)).save(buf, "PNG")
    settings = EnhanceSettings(model="realesr-animevideov3", outscale=2, device="cpu", tile=0)
    plan = plan_input(buf.getvalue(), settings, services.model_manager, services.config)[2]
    assert plan.resident_bytes == APP_RUNTIME_BYTES
    assert "the app's other models, server and uploads 160 MB" in plan.describe()


def test_an_automatic_webp_output_too_wide_for_webp_is_saved_as_png_with_a_note(tmp_path, model_manager):
    """A batch with the automatic format keeps a WebP input's format unless the output is wider than WebP holds:
    then the file is a PNG (its name says so) and the item's warnings say why."""
    from PIL import Image

    from engine.inference.batch import BatchJob, BatchServices, collect_inputs, run_batch
    from engine.settings import EnhanceSettings

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (6, 4100, 3), dtype=np.uint8)).save(src / "wide.webp", quality=80)
    Image.fromarray(rng.integers(0, 256, (6, 40, 3), dtype=np.uint8)).save(src / "small.webp", quality=80)
    settings = EnhanceSettings(model="realesr-animevideov3", outscale=4, device="cpu", tile=0,
                               quality_metrics=False)
    report = run_batch(collect_inputs([src]), BatchJob(settings=settings, output_dir=tmp_path / "out"),
                       BatchServices(model_manager, model_manager.config))
    by_name = {Path(item.input).name: item for item in report.items}
    assert all(item.ok for item in report.items), [item.error for item in report.items]
    wide, small = by_name["wide.webp"], by_name["small.webp"]
    assert wide.output.name == "wide.png" and small.output.name == "small.webp"
    with Image.open(wide.output) as saved:
        assert (saved.format, saved.size) == ("PNG", (16400, 24))
    assert any("WEBP image holds at most 16383 pixels" in w and "saved as PNG" in w for w in wide.report["warnings"])
    assert not any("saved as PNG" in w for w in small.report["warnings"])


def test_choose_tile_keeps_a_wide_image_s_bands_within_the_working_set(model_manager):
    import torch

    from engine.inference import planning
    from engine.inference.memory_plan import WORKING_SET_BYTES, band_bytes

    spec = model_manager.spec("realesr-animevideov3")
    narrow = planning.plan_tile(spec, 1000, 300, device_type="cpu", precision="fp32", batch_size=1,
                                free_bytes=64 << 30, memory_reused=True)
    wide = planning.plan_tile(spec, 1000, 6000, device_type="cpu", precision="fp32", batch_size=1,
                              free_bytes=64 << 30, memory_reused=True)
    assert 0 < wide.tile < (narrow.tile or 1000)
    small = planning.plan_tile(spec, 150, 200, device_type="cpu", precision="fp32", batch_size=1,
                               free_bytes=64 << 30, memory_reused=True)
    assert (wide.limit, small.tile, small.limit) == ("working set", 0, "memory")  # what the advisor's reason names
    rows, _cols, ratio = planning.read_shape(spec, 1000, 6000, wide.tile)
    assert wide.memory_bytes + band_bytes(rows, 1000, 6000, 4) <= WORKING_SET_BYTES
    assert planning.working_set_bytes(spec, 1000, 6000, wide.tile, torch.float32, 1) <= WORKING_SET_BYTES
    for other in range(32, 1000, 8):  # no tile that fits computes fewer pixels
        fits = planning.working_set_bytes(spec, 1000, 6000, other, torch.float32, 1) <= WORKING_SET_BYTES
        assert not fits or planning.read_shape(spec, 1000, 6000, other)[2] >= ratio, (other, wide.tile, ratio)


@pytest.mark.parametrize("model", ["RealESRGAN_x4plus", "realesr-animevideov3", "RealESRGAN_x4plus_anime_6B"])
def test_the_tiles_that_fit_the_working_set_are_the_smallest_ones(model):
    """What lets the tile search stop at the first tile that does not fit: every smaller tile fits, every larger
    one does not (a larger tile reads at least as much)."""
    import torch

    from engine.catalog import CATALOG
    from engine.inference import planning
    from engine.inference.memory_plan import WORKING_SET_BYTES

    spec = CATALOG[model]
    for height, width in ((1000, 6000), (1632, 1224), (3000, 3000), (480, 7000)):
        for dtype, batch_size in ((torch.float32, 1), (torch.float16, 4)):
            fits = [planning.working_set_bytes(spec, height, width, t, dtype, batch_size) <= WORKING_SET_BYTES
                    for t in range(32, max(height, width) + 1, 8)]
            assert fits == sorted(fits, reverse=True), (height, width, dtype)


def test_plan_input_reads_the_header_and_refuses_before_decoding(config, model_manager):
    from PIL import Image

    from engine.errors import JobTooLargeError
    from engine.inference.pipeline import plan_input
    from engine.settings import EnhanceSettings

    buf = io.BytesIO()
    Image.new("RGB", (3000, 2000)).save(buf, "JPEG", quality=5)
    settings = EnhanceSettings(model="realesr-animevideov3", outscale=2, device="cpu")
    model, size, plan = plan_input(buf.getvalue(), settings, model_manager, config)
    assert (model, size) == ("realesr-animevideov3", (6000, 4000)) and plan.output_bytes == 6000 * 4000 * 3
    tight = config.__class__(**{**config.__dict__, "max_job_memory_mb": plan.peak_bytes / MB * 0.5})
    with pytest.raises(JobTooLargeError, match="memory"):
        plan_input(buf.getvalue(), settings, model_manager, tight)


# ------------------------------------------------------------------------------------------------ REST
def test_rest_refuses_a_6300_square_jpeg_and_a_6000_square_webp_bomb_and_keeps_serving(tmp_path, shared_weights_dir):
    from PIL import Image

    bombs = []
    for side, fmt, mime in ((6300, "JPEG", "image/jpeg"), (6000, "WEBP", "image/webp")):
        buf = io.BytesIO()
        Image.new("L", (side, side)).save(buf, fmt, quality=1)  # 36-40 MP, inside the input limit, a few KB
        bombs.append((side, f"bomb.{fmt.lower()}", buf.getvalue(), mime))
    # planned at 1.05 and 2.1 GB (the WebP output encoded whole: 8 bytes a pixel), over this server's budget
    with serve_app(tmp_path, shared_weights_dir, max_job_memory_mb=900, device="cpu") as (url, _services):
        with httpx.Client(base_url=url, timeout=120) as client:
            for side, name, bomb, mime in bombs:
                response = client.post("/api/v1/enhance", files={"file": (name, bomb, mime)},
                                       data={"model": "realesr-animevideov3", "upscale_factor": "2"})
                assert response.status_code == 413, response.text
                body = response.json()
                assert body["stage"] == "validation" and "memory" in body["error"], body
                assert str(2 * side) in body["error"] and "Traceback" not in body["error"]
                assert client.get("/api/v1/health").status_code == 200
