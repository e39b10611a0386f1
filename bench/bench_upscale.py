"""Speed and seam benchmark of engine.upscaler against the official RealESRGANer (same weights, same images, CPU).

Prints a table: seconds, achieved GFLOP/s (2 * MACs / s, MACs per *input* pixel of the image, so tile overlap
counts as overhead) and its share of the machine's measured fp32 convolution peak, and the speed-up over the
official path. Real weights come from the bundled ncnn export when ``engine.ncnn_convert`` can convert them;
otherwise seeded random weights are used (same speed, meaningless seams). Not a test; numbers are noisy when
other jobs share the CPU, so repeat.

    .venv/bin/python bench/bench_upscale.py --quick
    .venv/bin/python bench/bench_upscale.py            # 256x256 and 512x512 (the 512 official run takes minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.upscaler import TileOptions, prepare_for_inference, upscale_image_ex  # noqa: E402
from engine.catalog import CATALOG  # noqa: E402
from engine.processor import cpu_cache_tile, overlap_for  # noqa: E402
from utils.allocator import reuse_freed_memory, reusing_freed_memory  # noqa: E402

logger = logging.getLogger("bench_upscale")
IMAGE = Path(__file__).resolve().parents[1] / "tests" / "data" / "upscaler" / "ost_009_crop192.png"
MACS = {"RealESRGAN_x4plus": 17_926_848, "realesr-animevideov3": 619_200}


def _timed(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def conv_peak(repeats: int = 3) -> dict[str, float]:
    """GFLOP/s of a 64->64 3x3 convolution on 1x64x128x128, per memory layout and dtype."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).eval()
    x = torch.randn(1, 64, 128, 128)
    flops = 2 * 64 * 64 * 9 * 128 * 128
    out = {}
    with torch.inference_mode():
        for name, layout, dtype in (("fp32 NCHW", torch.contiguous_format, torch.float32),
                                    ("fp32 NHWC", torch.channels_last, torch.float32),
                                    ("bf16 NHWC", torch.channels_last, torch.bfloat16)):
            c = copy.deepcopy(conv).to(dtype=dtype, memory_format=layout)
            xx = x.to(dtype=dtype).contiguous(memory_format=layout)
            for _ in range(3):  # primitive creation and caches
                c(xx)
            seconds, _ = _timed(lambda: c(xx), max(repeats, 5))
            out[name] = flops / seconds / 1e9
    return out


def load_net(name: str) -> tuple[torch.nn.Module, bool]:
    """The network with real weights when the bundled ncnn export converts, else seeded random weights."""
    from utils.compat import install_torchvision_shim

    install_torchvision_shim()
    from basicsr.archs.rrdbnet_arch import RRDBNet
    from realesrgan.archs.srvgg_arch import SRVGGNetCompact

    from engine.catalog import CATALOG

    spec = CATALOG[name]
    torch.manual_seed(0)
    net = (RRDBNet if spec.arch == "RRDBNet" else SRVGGNetCompact)(**dict(spec.arch_params)).eval()
    try:
        from engine.ncnn_convert import bundled_files, convert_ncnn

        param, weights = bundled_files(spec)
        net.load_state_dict(convert_ncnn(param, weights, spec.arch, spec.arch_params))
        return net, True
    except Exception as error:  # noqa: BLE001 - any failure means: fall back to random weights
        logger.warning("%s: real weights unavailable (%s); using random weights", name, error)
        return net, False


def official(net: torch.nn.Module, rgb: np.ndarray, tile: int, pre_pad: int, workdir: Path) -> np.ndarray:
    """RealESRGANer.enhance on HxWx3 float RGB in [0, 1]; returns float RGB in [0, 1]."""
    from realesrgan import RealESRGANer

    path = workdir / "net.pth"
    if not path.exists():
        torch.save({"params": net.state_dict()}, path)
    upsampler = RealESRGANer(scale=4, model_path=str(path), model=copy.deepcopy(net), tile=tile, tile_pad=10,
                             pre_pad=pre_pad, half=False, device="cpu")
    with contextlib.redirect_stdout(io.StringIO()):
        out, _ = upsampler.enhance(np.ascontiguousarray(rgb[..., ::-1] * 255.0, dtype=np.float32), outscale=4)
    return np.ascontiguousarray(out[..., ::-1], dtype=np.float32) / 255.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / max(np.mean((a - b) ** 2), 1e-12)))


def make_image(size: int) -> np.ndarray:
    import cv2

    bgr = cv2.imread(str(IMAGE), cv2.IMREAD_COLOR)
    bgr = np.tile(bgr, (-(-size // bgr.shape[0]), -(-size // bgr.shape[1]), 1))[:size, :size]
    return np.ascontiguousarray(bgr[..., ::-1], dtype=np.float32) / 255.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (64 and 128 px), one repeat")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--sizes", type=int, nargs="*", default=None, help="x4plus input sizes")
    parser.add_argument("--anime-sizes", type=int, nargs="*", default=None,
                        help="realesr-animevideov3 input sizes (default 256 and 512)")
    parser.add_argument("--models", nargs="*", default=["RealESRGAN_x4plus", "realesr-animevideov3"],
                        choices=["RealESRGAN_x4plus", "realesr-animevideov3"])
    parser.add_argument("--tile", type=int, default=128, help="tile for the equal-tile comparison")
    parser.add_argument("--no-memory-reuse", action="store_true",
                        help="run ours with glibc's default allocator too (to see what utils.allocator adds)")
    parser.add_argument("--overlaps", type=int, nargs="*", default=[20, 32],
                        help="our overlaps to compare at that tile (20 = the context of tile_pad 10)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 2)
    sizes = args.sizes or ([64] if args.quick else [256, 512])
    anime_sizes = args.anime_sizes or ([128] if args.quick else [256, 512])

    peaks = conv_peak()
    peak = peaks["fp32 NCHW"]
    print(f"threads={args.threads}  conv peak GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    print(f"'% peak' is against fp32 NCHW ({peak:.0f}); fp32 NHWC peak is {peaks['fp32 NHWC']:.0f}.\n")
    header = f"{'model':22} {'size':>5} {'path':34} {'s':>7} {'GFLOP/s':>8} {'%peak':>6} {'speed-up':>8} {'note'}"
    print(header)
    print("-" * len(header))

    def row(model, size, path, seconds, base, note=""):
        gflops = 2 * MACS[model] * size * size / seconds / 1e9
        speed = f"{base / seconds:7.2f}x" if base else "       -"
        print(f"{model:22} {size:5d} {path:34} {seconds:7.2f} {gflops:8.1f} {100 * gflops / peak:5.0f}% {speed} {note}",
              flush=True)

    # The official runs go first, in a process whose allocator is still glibc's default (what the official scripts
    # get); ours then run with the engine's allocator set-up (utils.allocator), unless --no-memory-reuse.
    models = [(m, sz) for m, sz in (("RealESRGAN_x4plus", sizes), ("realesr-animevideov3", anime_sizes))
              if m in args.models]
    nets = {m: load_net(m) for m, _ in models}
    official_runs: dict[tuple, tuple[float, np.ndarray]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model, model_sizes in models:
            net, _real = nets[model]
            workdir = Path(tmp) / model
            workdir.mkdir()
            for size in model_sizes:
                rgb = make_image(size)
                official_runs[model, size, 0] = _timed(lambda: official(net, rgb, 0, 10, workdir), repeats)
                if size > args.tile:
                    official_runs[model, size, args.tile] = _timed(
                        lambda: official(net, rgb, args.tile, 0, workdir), repeats)
    if not args.no_memory_reuse:
        print(f"allocator set-up for ours (utils.allocator): {'on' if reuse_freed_memory() else 'not available'}\n")

    for model, model_sizes in models:
        net, real = nets[model]
        fp32 = prepare_for_inference(net, "cpu", torch.float32)
        bf16 = prepare_for_inference(net, "cpu", torch.bfloat16)
        with torch.inference_mode():  # warm-up of oneDNN primitives
            fp32(torch.rand(1, 3, 32, 32).contiguous(memory_format=torch.channels_last))
            bf16(torch.rand(1, 3, 32, 32, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last))
        for size in model_sizes:
            rgb = make_image(size)
            base, ref = official_runs[model, size, 0]
            row(model, size, "official tile=0 pre_pad=10 (defaults)", base, 0, "weights: real" if real else
                "weights: random")
            t, (out, _) = _timed(lambda: upscale_image_ex(fp32, rgb, TileOptions(scale=4)), repeats)
            row(model, size, "ours fp32 tile=0", t, base, f"PSNR vs official {psnr(out, ref):.1f} dB")
            t, (out16, _) = _timed(lambda: upscale_image_ex(bf16, rgb, TileOptions(scale=4, dtype=torch.bfloat16)),
                                   repeats)
            row(model, size, "ours bf16 tile=0", t, base, f"PSNR vs fp32 {psnr(out16, out):.1f} dB")
            cache_tile = cpu_cache_tile(CATALOG[model], size, size, 0, memory_reused=reusing_freed_memory())
            if cache_tile:  # what `enhance --tile auto` (the default) runs on a CPU
                overlap = overlap_for(CATALOG[model], cache_tile)
                t, (tout, st) = _timed(lambda: upscale_image_ex(fp32, rgb, TileOptions(
                    scale=4, tile=cache_tile, overlap=overlap, batch_size=1)), repeats)
                err = np.abs(tout - out)
                row(model, size, f"ours fp32 auto (tile={cache_tile} ov={overlap})", t, base,
                    f"err vs untiled mean {err.mean():.5f} max {err.max():.3f}, compute x{st.compute_ratio:.2f}")
            if size > args.tile:
                tile = args.tile
                tb, tref = official_runs[model, size, tile]
                err = np.abs(tref - out)
                row(model, size, f"official tile={tile} pad=10", tb, 0,
                    f"err vs untiled mean {err.mean():.5f} max {err.max():.3f}")
                # overlap 20 reads as much context as tile_pad 10 (equal compute); more overlap, fewer seams.
                # batch_size=1: what the engine uses on a CPU (one tile stays in cache).
                for overlap in args.overlaps:
                    t, (tout, st) = _timed(lambda: upscale_image_ex(fp32, rgb, TileOptions(
                        scale=4, tile=tile, overlap=overlap, batch_size=1)), repeats)
                    ours = np.abs(tout - out)
                    row(model, size, f"ours fp32 tile={tile} overlap={overlap}", t, tb,
                        f"err mean {ours.mean():.5f} ({err.mean() / ours.mean():.1f}x less) max {ours.max():.3f} "
                        f"({err.max() / max(ours.max(), 1e-9):.1f}x less), compute x{st.compute_ratio:.2f}")


if __name__ == "__main__":
    main()
