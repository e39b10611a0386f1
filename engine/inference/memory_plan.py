"""The memory plan of one image job: its peak before anything is allocated, and whether it fits. Pure.

The engine streams (see :class:`engine.upscaler.BandStream` and :mod:`engine.inference.streaming`), so a job's
memory is a sum of parts that each have a known size:

* ``base``: the process (torch, the runtime, the metric networks) and the network's weights (twice: the cached
  float32 copy and the prepared one); spandrel's import too when the job needs it (:data:`SPANDREL_BYTES`).
  Measured on CPU in a fresh process (bench/bench_memory.py) with the registry's torch 2.14.1+cu130: importing
  torch alone reaches 704 MB (220 MB of it the CUDA libraries' pages, loaded even without a GPU; 510 MB with the
  build measured before), a 64x64 ``main.py enhance`` with quality metrics 706-867 MB before the model manager
  stopped copying the weights, 719 MB after (realesr-animevideov3, three runs; the libraries' file-backed pages
  vary with the page cache), 1065 MB when it still imported spandrel. The base is that job's peak less its planned
  parts, so a plan errs on the safe side by about what those parts hold back (measured plan/peak 1.08-1.18x).
  Where CUDA does not work the process hands the CUDA libraries' pages back once torch is imported, and the base
  is :data:`CUDA_LIBRARIES_BYTES` lower (a tiny job then peaks while importing: ~620 MB).
* ``input``: the decoded pixels; images with alpha also their float copies (colour with its transparent pixels
  bled, alpha). Others have none: the engine converts each tile to float as it reads it.
* ``network``: activations of one forward pass (:func:`engine.upscaler.estimate_memory_bytes`), the tile's
  float input and the tile outputs; on a GPU the activations live in VRAM, checked against free VRAM instead.
* ``bands``: the blend buffer of one tile row at the network's scale (weighted sums, reused for every tile row:
  :data:`BAND_BYTES_PER_PIXEL` per pixel; the weights are recomputed per band, not kept) and :data:`STREAM_ROWS`
  rows of the finished bands' copies (normalised rows, the resizer's context rows, the dtype conversion), which do
  not grow with the tile.
* ``output``: the preallocated output (the input's channels and depth).
* ``metrics``: quality metrics compare the input and the output shrunk back to it band by band
  (:data:`METRICS_BAND_BYTES_PER_PIXEL`, and the output's rows that the band is shrunk from) and work on bounded
  crops of the output (:data:`METRICS_FIXED_BYTES`). They run after the network, in the memory its activations and
  bands held, so the peak counts the larger of the two (:attr:`MemoryPlan.peak_bytes`).
* ``encode``: writing the output whole in its format (``utils.image_io.encoding_bytes``: PIL's copy and libwebp's
  buffers for JPEG and WebP, the encoded bytes), after the metrics, in the same freed memory.
* ``held`` (a batch that overlaps): the previous image's output, its input (its metrics may be measured there) and
  its metrics or encoding, and the next input (:func:`overlapped`).
* ``resident`` (a long-lived app): what the process holds besides the runtime and the job: the networks the
  model manager keeps loaded that the job does not use (other models, a face network when it restores no faces)
  and, in the web app, its server (:data:`APP_RUNTIME_BYTES`) and the REST uploads held for their jobs:
  ``engine.model_manager.ModelManager.resident_bytes``.
  The budget (``engine.inference.planning.memory_budget``) counts what the process holds already, so the peak must
  too.
* ``faces``: the face network (:data:`FACE_NETWORK_BYTES`) and, for an output that is not 8-bit RGB, the 8-bit RGB
  copy the identity metric cuts faces from; the faces themselves are pasted into the output in place.

:func:`plan_memory` takes plain numbers and returns a :class:`MemoryPlan`; :func:`engine.inference.planning`
uses :func:`band_bytes` to keep a tile's activations and bands within :data:`WORKING_SET_BYTES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MB = 1024 * 1024

BASE_PROCESS_BYTES = 720 * MB
"""Resident size of a process that has run a small job with quality metrics (torch, runtime, metric networks):
a 64x64 job's measured peak less its planned metrics, network and bands."""

APP_RUNTIME_BYTES = 160 * MB
"""What the web app's process holds besides the CLI's runtime (:data:`BASE_PROCESS_BYTES`): Gradio, FastAPI and
uvicorn with the app's UI modules (144 MB of RSS to import, measured) and their running state; a server after the
warm-up held 698 MB, of it 64 MB the warm-up's network, against ~475 MB for a fresh CLI process. The model manager
the app creates counts it (``ModelManager(host_bytes=...)``)."""

CUDA_LIBRARIES_BYTES = 250 * MB
"""What the base holds of the CUDA libraries' pages that torch's CUDA build maps at import, which a machine without
CUDA lets go (``utils.gpu.release_unusable_cuda_libraries``). :data:`BASE_PROCESS_BYTES` was measured with ~0.40 GB
of file-backed pages; with those libraries let go the bench_memory jobs hold 0.13-0.14 GB (the code before 0.27 GB
in the same minutes, 0.37-0.48 GB when the page cache is warmer)."""

SPANDREL_BYTES = 192 * MB
"""What importing spandrel adds (its 45 architectures, torchvision, ``torch._dynamo``): jobs with faces or with a
network of another architecture than ``engine.models.networks`` builds pay it (counted by architecture: an
RRDBNet or Compact file that is not in the official key layout goes to spandrel too, unplanned)."""

BAND_BYTES_PER_PIXEL = 12
"""Host bytes per pixel of a tile row's blend buffer at the network's scale: float32 RGB sums (the weights they
are divided by are recomputed for each finished band, see ``engine.upscaler._WeightRows``). One buffer serves every
tile row (the overlap carried over is moved up in place), and finished rows leave it in bands of
``engine.upscaler.FINAL_CHUNK_ROWS`` rows, counted in :data:`STREAM_ROWS`."""

STREAM_ROWS = 680
"""Rows of the output's width (at the network's scale, float32 RGB: :data:`BAND_BYTES_PER_PIXEL`) that the finished
bands take on their way out, whatever the tile: one band normalised into an HxWx3 float32 copy with its weight
sums, its clipped and converted copies (64 rows each), and the resizer's pending source rows with their context
and concatenation (up to ~2 x 208 rows at x4 -> x2)."""

WORKING_SET_BYTES = 384 * MB
"""The most one tile's activations plus its band buffers may take. Larger tiles save only overlap (a few per
cent at 256 px and more) but cost memory that grows with the output's width."""

WHOLE_IMAGE_BYTES = 1024 * MB
"""The most a small image's untiled activations may take when running it whole saves
:data:`WHOLE_IMAGE_GAIN` or more of the compute (RealESRGAN_x4plus at 256²: ~0.7 GB, 1.43x faster than 104-px
tiles on a 2-core CPU); larger images stream in tiles within :data:`WORKING_SET_BYTES`."""

WHOLE_IMAGE_GAIN = 1.15
"""The tiles' compute over the whole image's (:attr:`engine.upscaler.TilePlan.compute_ratio`) from which a small
image runs whole (see :data:`WHOLE_IMAGE_BYTES`)."""

INPUT_BYTES_PER_PIXEL_FLOAT = 28
"""Float copies per input pixel of an image with alpha: the float image (up to 16 B), the bled RGB network input
(12 B). Images without alpha have none (see ``engine.upscaler.BandStream``)."""

FACE_NETWORK_BYTES = 1100 * MB
"""GFPGAN v1.4 (its official width) on the CPU: 330 MB of float32 weights and a peak of 750 MB more during one
512x512 face's forward pass (``ru_maxrss`` around ``engine.models.loader.face_forward``, torch 2.14, 2 threads)."""

METRICS_FIXED_BYTES = 48 * MB
"""The NIQE crops (at most 768x768, a few float copies: 40 MB traced) and LPIPS's centre crops (at most 1024x1024)
and its activations on them."""

METRICS_BAND_BYTES_PER_PIXEL = 96
"""Per pixel of one band of ``utils.metrics.METRIC_BAND_ROWS`` input rows: LR consistency's float64 luminance and
SSIM statistics (about a dozen copies), and the band's input and shrunk output as float."""


@dataclass(frozen=True)
class MemoryPlan:
    """What one job will hold at its peak, in bytes, and the limit it was planned against.

    ``vram_bytes`` is 0 on a CPU. ``fits`` is False when the peak passes ``budget_bytes`` (host) or the
    activations pass ``vram_budget_bytes`` (GPU).
    """

    tile: int
    base_bytes: int
    input_bytes: int
    network_bytes: int
    band_bytes: int
    output_bytes: int
    metrics_bytes: int
    faces_bytes: int
    vram_bytes: int
    budget_bytes: int
    vram_budget_bytes: int = 0
    held_bytes: int = 0  # a batch's neighbours while this network runs (see :func:`overlapped`)
    encode_bytes: int = 0  # writing the output whole in its format, after the metrics
    resident_bytes: int = 0  # what a long-lived process holds that this job does not use (see ``resident`` above)

    @property
    def peak_bytes(self) -> int:
        """Everything held at once, except that the quality metrics run after the network and its bands are freed,
        in that memory, and the encoding after them: the largest of the three counts (bench/bench_memory.py, six
        in-memory CPU cases: plan over measured peak 1.18-1.25x when the network and the metrics were both
        counted, 1.04-1.17x with the larger)."""
        return (self.base_bytes + self.resident_bytes + self.input_bytes + self.output_bytes + self.faces_bytes
                + self.held_bytes + max(self.network_bytes + self.band_bytes, self.metrics_bytes, self.encode_bytes))

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes and (
            not self.vram_bytes or self.vram_bytes <= self.vram_budget_bytes)

    def describe(self) -> str:
        """One line for people: the peak and its largest parts."""
        parts = ", ".join(f"{name} {value / MB:.0f} MB" for name, value in (
            ("output", self.output_bytes), ("bands", self.band_bytes), ("network", self.network_bytes),
            ("input", self.input_bytes), ("metrics after the network", self.metrics_bytes),
            ("encoding after the metrics", self.encode_bytes), ("faces", self.faces_bytes),
            ("the batch's previous and next images", self.held_bytes),
            ("the app's other models, server and uploads", self.resident_bytes), ("runtime", self.base_bytes))
            if value)
        vram = f"; VRAM {self.vram_bytes / MB:.0f} MB" if self.vram_bytes else ""
        tile = f"tile {self.tile}" if self.tile else "whole image"
        return f"peak RAM {self.peak_bytes / MB:.0f} MB ({parts}){vram}, {tile}"

    def as_dict(self) -> dict:
        return {"peak_mb": round(self.peak_bytes / MB, 1), "budget_mb": round(self.budget_bytes / MB, 1),
                "vram_mb": round(self.vram_bytes / MB, 1), "tile": self.tile, "fits": self.fits,
                "parts_mb": {name: round(getattr(self, f"{name}_bytes") / MB, 1) for name in (
                    "base", "input", "network", "band", "output", "metrics", "encode", "faces", "held",
                    "resident")}}


def band_bytes(tile_rows: int, height: int, width: int, scale: int) -> int:
    """Host bytes of the blend buffer of one tile row (``tile_rows`` input rows high, as the tile plan reads them)
    and the finished bands' copies (``tile_rows`` 0: the whole image is one tile, its output counted with the
    network; only the bands' copies remain). Pure."""
    rows = min(height, tile_rows) * scale
    return int((rows + min(height * scale, STREAM_ROWS)) * width * scale * BAND_BYTES_PER_PIXEL)


def metrics_bytes(width: int, height: int, out_width: int, out_height: int) -> int:
    """Quality metrics' part of a job with a ``width`` x ``height`` input and an ``out_width`` x ``out_height``
    output (see the module docstring): a band of the input, the output's rows it is shrunk from (float RGB, the
    resizer's pending rows and their joined copy) and the crops. Pure."""
    import cv2

    from utils.band_resize import BandResizer
    from utils.metrics import METRIC_BAND_ROWS, METRIC_SHRINK_ROWS

    shrink_rows = 0
    if (out_width, out_height) != (width, height):
        shrink_rows = BandResizer((out_width, out_height), (width, height), band_rows=METRIC_SHRINK_ROWS,
                                  interpolation=cv2.INTER_AREA).buffer_rows
    return int(width * min(height, METRIC_BAND_ROWS) * METRICS_BAND_BYTES_PER_PIXEL
               + 2 * shrink_rows * out_width * 3 * 4 + METRICS_FIXED_BYTES)


def faces_bytes(out_pixels: int, channels: int, sample: int) -> int:
    """Face restoration's part of a job (see the module docstring). Pure."""
    copy = 0 if (channels, sample) == (3, 1) else out_pixels * (3 + (4 * channels if sample == 2 else 0))
    return int(FACE_NETWORK_BYTES + copy)


@dataclass(frozen=True)
class JobShape:
    """The sizes a job's memory follows: the decoded input (channels 1..4, 8 or 16 bits), the output and the format
    it is written in whole (``utils.image_io.encoding_bytes``; "" when nothing is encoded whole)."""

    width: int
    height: int
    channels: int
    bit_depth: int
    out_width: int
    out_height: int
    output_format: str = ""


@dataclass(frozen=True)
class NetworkRun:
    """How the network runs: its scale, the tiling (tile 0 = whole image), one forward pass's activation bytes
    (``engine.upscaler.estimate_memory_bytes``), the weight file's size, the device type ("cpu", "cuda"...; off
    the CPU the activations count against VRAM) and the input pixels one forward pass reads (``read``, as
    ``engine.upscaler.tile_shape`` gives them; None: ``tile + 2 × overlap`` a side, clipped to the image)."""

    scale: int
    tile: int
    overlap: int
    activation_bytes: int
    weights_bytes: int
    device_type: str = "cpu"
    read: tuple[int, int] | None = None


def plan_memory(shape: JobShape, run: NetworkRun, budget: tuple[int, int], *, quality_metrics: bool = True,
                face_enhance: bool = False, model_alpha: bool = False, spandrel: bool = False,
                cuda_libraries_released: bool = False) -> MemoryPlan:
    """The peak of one image job (see the module docstring). Pure.

    Args:
        shape: input and output sizes; run: the network's run.
        budget: (host bytes, VRAM bytes) the job's process may reach.
        quality_metrics, face_enhance: whether those stages run; model_alpha: alpha runs through the network
            (its float input adds to the input part; its bands reuse the colour's, one after the other).
        spandrel: the job imports spandrel (faces, or a network the app does not build itself).
        cuda_libraries_released: the process handed back the CUDA libraries' pages (:data:`CUDA_LIBRARIES_BYTES`).
    """
    from utils.image_io import encoding_bytes

    width, height, scale, tile = shape.width, shape.height, run.scale, run.tile
    sample = shape.bit_depth // 8
    pixels = width * height
    if not tile:
        read_h, read_w = height, width
    elif run.read:
        read_h, read_w = run.read
    else:
        read_h, read_w = min(height, tile + 2 * run.overlap), min(width, tile + 2 * run.overlap)
    tile_outputs = 2 * read_h * read_w * scale * scale * 3 * 4  # the device output and its float32 CPU copy
    tile_inputs = 2 * read_h * read_w * 3 * 4  # the tile as float RGB and the batch made of it
    on_gpu = run.device_type != "cpu"
    floats = INPUT_BYTES_PER_PIXEL_FLOAT + (12 if model_alpha else 0) if shape.channels in (2, 4) else 0
    input_bytes = pixels * (shape.channels * sample + floats)
    out_pixels = shape.out_width * shape.out_height
    base = BASE_PROCESS_BYTES - (CUDA_LIBRARIES_BYTES if cuda_libraries_released else 0)
    return MemoryPlan(
        tile=int(tile), base_bytes=base + 2 * run.weights_bytes + (SPANDREL_BYTES if spandrel else 0),
        input_bytes=int(input_bytes),
        network_bytes=int(tile_outputs + tile_inputs + (0 if on_gpu else run.activation_bytes)),
        band_bytes=band_bytes(read_h if tile else 0, height, width, scale),
        output_bytes=int(out_pixels * shape.channels * sample),
        metrics_bytes=metrics_bytes(width, height, shape.out_width, shape.out_height) if quality_metrics else 0,
        encode_bytes=encoding_bytes(shape.out_width, shape.out_height, shape.channels, shape.bit_depth,
                                    shape.output_format) if shape.output_format else 0,
        faces_bytes=faces_bytes(out_pixels, shape.channels, sample) if face_enhance else 0,
        vram_bytes=int(run.activation_bytes + 2 * run.weights_bytes) if on_gpu else 0,
        budget_bytes=int(budget[0]), vram_budget_bytes=int(budget[1]))


def gigabytes(n: int) -> str:
    return f"{n / 1024 ** 3:.2f} GB" if n >= 1024 ** 3 else f"{math.ceil(n / MB)} MB"


STREAM_QUEUE_BANDS = 6
"""Output bands a streamed job holds at once: the encoder's queue (4), the band being encoded and the one being
converted (see :func:`engine.inference.pipeline.enhance_streamed`)."""

STREAM_CHUNK_ROWS = 64
"""Rows of the bands the engine hands on at the network's scale (``engine.upscaler.FINAL_CHUNK_ROWS``)."""


def stream_band_rows(height: int, scale: int, out_height: int) -> int:
    """Output rows of one band in flight when a ``height``-row input goes through an ``x scale`` network and is
    resized to ``out_height`` rows: the engine's bands, or the resizer's (``utils.band_resize.output_step``)."""
    from utils.band_resize import output_step

    network_rows = height * scale
    if network_rows == out_height:
        return min(out_height, STREAM_CHUNK_ROWS)
    step = output_step(network_rows, out_height)
    return min(out_height, max(step, math.ceil(STREAM_CHUNK_ROWS * out_height / network_rows)))


def streamed(plan: MemoryPlan, shape: JobShape, scale: int) -> MemoryPlan:
    """The plan of the same job written straight into a file in strips: no output array, no quality metrics, no
    faces (a streamed output does neither) and no whole encoding, only :data:`STREAM_QUEUE_BANDS` bands of output
    rows in flight (:func:`stream_band_rows`, whatever the tile). Pure."""
    from dataclasses import replace

    sample = shape.bit_depth // 8
    rows = stream_band_rows(shape.height, scale, shape.out_height)
    return replace(plan, output_bytes=int(STREAM_QUEUE_BANDS * rows * shape.out_width * shape.channels * sample),
                   metrics_bytes=0, faces_bytes=0, encode_bytes=0)


def overlapped(plan: MemoryPlan) -> MemoryPlan:
    """The plan of the same job in a batch that overlaps (``engine.inference.batch.run_batch``): while its network
    runs, the previous image's result is measured and saved (its output and input, and its metrics or its
    encoding) and the next input is decoded (its pixels), counted as an image of the same size on either side.
    Pure."""
    from dataclasses import replace

    return replace(plan, held_bytes=plan.output_bytes + max(plan.metrics_bytes, plan.encode_bytes)
                   + 2 * plan.input_bytes)


def output_mode(fits_in_memory: bool, fits_streamed: bool, *, to_stream_file: bool, streamable: bool = True) -> str:
    """How a job runs, from its two plans: ``"memory"`` (the output whole in RAM) when that fits, else
    ``"stream"`` (strips straight into a TIFF or PNG file) when the streamed plan fits and the job writes such a
    file of a streamable image (no alpha, no faces), else ``"refuse"``. Pure."""
    if fits_in_memory:
        return "memory"
    if fits_streamed and to_stream_file and streamable:
        return "stream"
    return "refuse"
