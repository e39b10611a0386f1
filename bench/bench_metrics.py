"""Benchmark: are the quality metrics cheap enough to be on by default?

Times :func:`utils.metrics.calculate_image_metrics` on a 512x512 RGB photo and its 4x output (2048x2048), and
the enhance itself on CPU with a RealESRGAN_x4plus-sized network: basicsr's RRDBNet (23 blocks, x4, the same
architecture and cost) with random weights, run through ``engine.upscaler.upscale_image`` when that module
exists. Prints both times and their ratio; the target is under 10%.

The metrics include LPIPS and the identity similarity of ``--faces`` face pairs, with their real networks:
the lpips package's LPIPS v0.1 linear layers, and torchvision's AlexNet and facexlib's ArcFace IR-SE50 with
random weights (the same cost as the published weights, which can't be downloaded offline).

Usage::

    .venv/bin/python bench/bench_metrics.py [--size 512] [--enhance-size N] [--repeat 3] [--threads N]

The enhance of 512x512 takes many minutes on a small CPU. ``--enhance-size 128`` times the enhance on a
128x128 input and scales the time by the pixel ratio (a convolutional network's cost is linear in pixels; the
output says when it extrapolated); the metrics are always timed on the full ``--size`` input and its output.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PHOTO = ROOT / "tests" / "data" / "metrics" / "ADE_val_00000114.jpg"


def _input_image(size: int) -> np.ndarray:
    """A ``size x size`` RGB uint8 photo (the test photo, resized), so NIQE sees natural content."""
    bgr = cv2.imread(str(PHOTO), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SystemExit(f"missing test photo {PHOTO}")
    return cv2.cvtColor(cv2.resize(bgr, (size, size), interpolation=cv2.INTER_CUBIC), cv2.COLOR_BGR2RGB)


def _enhance_fn():
    """Return ``(name, fn(uint8 RGB image) -> uint8 RGB image)``: a 4x RealESRGAN_x4plus-sized enhance on CPU.

    The network is basicsr's RRDBNet (23 blocks, x4) with random weights: the real model's architecture and
    cost. It runs through ``engine.upscaler.upscale_image`` (the app's tiled inference, whole image in one tile)
    when that module exists, else as a plain forward pass.
    """
    import torch

    from utils.compat import install_torchvision_shim

    install_torchvision_shim()
    from basicsr.archs.rrdbnet_arch import RRDBNet

    torch.manual_seed(0)
    net = RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32, scale=4).eval()

    if importlib.util.find_spec("engine.upscaler") is not None:
        from engine.upscaler import TileOptions, upscale_image

        def run(image: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                out = upscale_image(net, image.astype(np.float32) / 255.0, TileOptions(scale=4, tile=0))
            return (np.clip(out, 0.0, 1.0) * 255.0).round().astype(np.uint8)

        return "engine.upscaler.upscale_image + RRDBNet(23 blocks, x4, random weights)", run

    def run_plain(image: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32) / 255.0)[None]
        with torch.inference_mode():
            y = net(x)[0].clamp_(0, 1)
        return (y.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)

    return "RRDBNet(23 blocks, x4, random weights), plain forward", run_plain


def _learned_metric_networks(folder: Path) -> tuple[object, object]:
    """``(LPIPS network, ArcFace network)`` loaded through the model manager: the real linear layers from the
    lpips package, random weights of the real AlexNet and ArcFace IR-SE50 architectures written to ``folder``."""
    import torch
    import torchvision

    from config import Config
    from engine.catalog import CATALOG, IDENTITY_MODEL, LPIPS_MODELS
    from engine.model_manager import ModelManager
    from engine.models.loader import reference_network

    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), folder / CATALOG[LPIPS_MODELS[0]].filename)
    arcface = CATALOG[IDENTITY_MODEL]
    torch.save(reference_network(arcface.arch, arcface.arch_params).state_dict(), folder / arcface.filename)
    manager = ModelManager(Config.from_env(env={}, dotenv_path=None, weights_dir=folder, verify_checksums=False))
    lpips_network = manager.local_network(LPIPS_MODELS[1])
    if lpips_network is None:
        raise SystemExit("the lpips package (with its v0.1 linear layers) is not installed")
    return lpips_network, manager.local_network(IDENTITY_MODEL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="input side in pixels (default 512)")
    parser.add_argument("--enhance-size", type=int, default=0,
                        help="time the enhance on this input side and scale by the pixel ratio (0: --size)")
    parser.add_argument("--repeat", type=int, default=3, help="metrics repetitions; the best is kept")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--faces", type=int, default=2, help="face pairs for the identity metric (default 2)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from utils.metrics import calculate_image_metrics, niqe

    import atexit
    import shutil
    import tempfile

    from utils.metrics import lpips_distance

    image = _input_image(args.size)
    niqe(_input_image(256))  # load basicsr and the NIQE parameters once, outside the timing
    folder = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    atexit.register(shutil.rmtree, folder, True)
    lpips_network, arcface = _learned_metric_networks(folder)
    lpips_distance(image[:64, :64], image[:64, :64], lpips_network)  # first run outside the timing
    face = cv2.resize(image, (112, 112), interpolation=cv2.INTER_AREA)
    face_pairs = [(face, face)] * args.faces

    enhance_size = args.enhance_size or args.size
    name, enhance = _enhance_fn()
    print(f"enhance: {name}, input {enhance_size}x{enhance_size}, torch threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    output = enhance(_input_image(enhance_size))
    measured_s = time.perf_counter() - t0
    factor = (args.size / enhance_size) ** 2
    enhance_s = measured_s * factor
    scale = output.shape[0] / enhance_size
    print(f"enhance time: {measured_s:.2f} s for {enhance_size}x{enhance_size} (x{scale:g})"
          + (f" -> {enhance_s:.2f} s extrapolated to {args.size}x{args.size}" if factor != 1 else ""))

    # Time the metrics on the true output shape; content: a Lanczos upscale (natural-looking, unlike the
    # random-weight network's output, so NIQE does its usual amount of work).
    h = w = int(round(args.size * scale))
    natural = cv2.resize(image, (w, h), interpolation=cv2.INTER_LANCZOS4)
    times = []
    for _ in range(max(1, args.repeat)):
        t0 = time.perf_counter()
        metrics = calculate_image_metrics(image, natural, 100_000, 400_000, lpips_network=lpips_network,
                                          identity_network=arcface, face_pairs=face_pairs)
        times.append(time.perf_counter() - t0)
    metrics_s = min(times)
    print(f"metrics time: {metrics_s:.3f} s (best of {len(times)}; lr_psnr {metrics['lr_psnr']:.2f} dB, "
          f"niqe {metrics['niqe_input']:.2f} -> {metrics['niqe_output']:.2f}, lpips and {args.faces} "
          f"identity pairs computed: {metrics['lpips'] is not None and metrics['identity_similarity'] is not None})")
    ratio = metrics_s / enhance_s
    print(f"ratio metrics/enhance: {ratio:.2%} (target < 10%) -> {'OK' if ratio < 0.10 else 'TOO SLOW'}")
    return 0 if ratio < 0.10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
