"""The GPU path (issue 15): RealESRGAN_x4plus in fp16 on CUDA, ours against the official ``RealESRGANer(half=True)``.

Rows, each in frames per second over ``--frames`` frames of one size (after ``--warm`` frames that are not timed),
for 512x512 and 1920x1080 inputs (``--sizes``):

* official: ``RealESRGANer(tile=0, half=True).enhance`` per frame (uint8 BGR in, uint8 BGR out), its defaults;
* ours, frames: the app's frame enhancer (``engine.processor.make_frame_enhancer``: the video path, the engine's
  tiling, precision and OOM handling, ``--batch`` frames per call), uint8 RGB in and out;
* ours, images: ``enhance_image_direct`` per frame with quality metrics off (what a batch of images pays on top).

Beside each: the GPU's fp16 peaks measured in the same run (a 64->64 3x3 convolution, channels_last, and a
4096² matmul) and the share of the convolution peak our frames reach (2 * MACs per input pixel * pixels * frames/s).
Prints why and exits 0 when CUDA is not usable. ``--device cpu`` runs the same rows in fp32 on the CPU (a check
of the script itself at small sizes, not a GPU figure). Not a test.

    .venv/bin/python bench/bench_gpu.py                       # 512² and 1920x1080, 20 frames each
    .venv/bin/python bench/bench_gpu.py --sizes 512x512 --frames 50 --batch 4
    .venv/bin/python bench/bench_gpu.py --device cpu --sizes 48x32 --frames 2 --warm 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "RealESRGAN_x4plus"
MACS_PER_PIXEL = 17_926_848  # RealESRGAN_x4plus, per input pixel (as bench_upscale.MACS)


def peaks(torch, device, dtype, sync, side: int) -> dict[str, float]:
    """TFLOP/s of a 64->64 3x3 convolution on 8x64x``side``² (channels_last) and of a (16 * ``side``)² matmul."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(device=device, dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(8, 64, side, side, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    n = 16 * side
    a = torch.randn(n, n, device=device, dtype=dtype)
    out = {}
    with torch.inference_mode():
        for name, work, flops in (("conv 64->64 3x3", lambda: conv.eval()(x), 2 * 64 * 64 * 9 * 8 * side * side),
                                  (f"matmul {n}²", lambda: a @ a, 2 * n ** 3)):
            for _ in range(3):
                work()
            sync()
            start, repeats = time.perf_counter(), 10
            for _ in range(repeats):
                work()
            sync()
            out[name] = flops * repeats / (time.perf_counter() - start) / 1e12
    return out


def frames_per_second(run, frames: list, warm: int, sync) -> float:
    """``run(batch of frames)`` timed over ``frames`` after ``warm`` untimed frames, the device synchronised."""
    for _ in range(warm):
        run(frames[:1])
    sync()
    start = time.perf_counter()
    run(frames)
    sync()
    return len(frames) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=["512x512", "1920x1080"])
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--warm", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="frames per call of our frame enhancer")
    parser.add_argument("--weights-dir", type=Path, default=None)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()

    import numpy as np
    import torch

    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        print(f"CUDA is not usable here (torch {torch.__version__}, built for CUDA {torch.version.cuda}): "
              "nothing measured. Run this on a machine with an NVIDIA GPU.")
        return
    from config import Config
    from engine.model_manager import ModelManager
    from engine.models.loader import read_state_dict
    from engine.processor import EnhanceSettings, enhance_image_direct, make_frame_enhancer
    from utils.compat import install_torchvision_shim

    install_torchvision_shim()
    from basicsr.archs.rrdbnet_arch import RRDBNet
    from realesrgan import RealESRGANer

    config = Config.from_env(env={}, dotenv_path=None, **({"weights_dir": args.weights_dir} if args.weights_dir
                                                          else {}))
    manager = ModelManager(config)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    measured = peaks(torch, torch.device(args.device), torch.half if on_gpu else torch.float32, sync,
                     256 if on_gpu else 32)
    where = torch.cuda.get_device_name() if on_gpu else "CPU (fp32: a check of this script, not a GPU figure)"
    print(f"{where}, torch {torch.__version__}, CUDA {torch.version.cuda}; {'fp16' if on_gpu else 'fp32'} peaks: "
          + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in measured.items()))
    conv_peak = measured["conv 64->64 3x3"] * 1e12
    with tempfile.TemporaryDirectory() as tmp:
        official_pth = Path(tmp) / "official.pth"  # the official key layout, from the app's (converted) weights
        torch.save({"params": read_state_dict(manager.weights_path(MODEL, allow_download=False)[0])}, official_pth)
        net = RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32, scale=4)
        official = RealESRGANer(scale=4, model_path=str(official_pth), model=net, tile=0, tile_pad=10, pre_pad=0,
                                half=on_gpu, device=torch.device(args.device))
        settings = EnhanceSettings(model=MODEL, device=args.device, precision="fp16" if on_gpu else "fp32",
                                   outscale=4, tile="auto",
                                   batch_size=args.batch, quality_metrics=False)
        frames_enhancer = make_frame_enhancer(manager, settings)
        print(f"{'size':>10} {'path':34} {'frames/s':>9} {'ratio':>6} {'%conv peak':>10}")
        for size in args.sizes:
            width, height = map(int, size.lower().split("x"))
            rng = np.random.default_rng(0)
            base = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
            frame = np.ascontiguousarray(np.kron(base, np.ones((8, 8, 1), np.uint8))[:height, :width])
            frames = [frame] * args.frames

            def run_official(batch):
                for f in batch:
                    official.enhance(f[..., ::-1].copy(), outscale=4)

            def run_frames(batch):
                for start in range(0, len(batch), args.batch):
                    frames_enhancer(batch[start:start + args.batch])

            def run_images(batch):
                for f in batch:
                    enhance_image_direct(f, settings, manager)

            base_fps = frames_per_second(run_official, frames, args.warm, sync)
            print(f"{size:>10} {f'official RealESRGANer half={on_gpu}':34} {base_fps:9.2f}      -          -")
            for name, run in (("ours, frame enhancer (video path)", run_frames),
                              ("ours, enhance_image_direct", run_images)):
                fps = frames_per_second(run, frames, args.warm, sync)
                share = 2 * MACS_PER_PIXEL * width * height * fps / conv_peak
                print(f"{size:>10} {name:34} {fps:9.2f} {fps / base_fps:5.2f}x {100 * share:9.0f}%", flush=True)
            vram = f"peak VRAM {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; " if on_gpu else ""
            print(f"{'':>10} {vram}load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
