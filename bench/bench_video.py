"""Frames per second of engine.video against the official video script's approach, same model, clip and device.

The official ``inference_realesrgan_video.py`` reads one rgb24 frame from an ffmpeg pipe, runs
``RealESRGANer.enhance`` on it, writes it to a second ffmpeg pipe, and repeats, all in one thread. Ours decodes,
runs batches through the app's own engine (make_frame_enhancer: the processor's tiling, precision and OOM handling)
and encodes in overlapping threads. Both use SRVGGNetCompact (realesr-animevideov3 weights when the
bundled ncnn export can be imported, else seeded random weights: the speed is the same) for a ×2 result.

    .venv/bin/python bench/bench_video.py [--input CLIP] [--frames N] [--batch 4] [--device cpu] [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import ffmpeg as ff  # noqa: E402
from engine.video import VideoLimits, VideoRunOptions, VideoSettings, probe_video, upscale_video  # noqa: E402

logger = logging.getLogger("bench_video")
DEFAULT_INPUT = ROOT / "tests" / "data" / "video" / "onepiece_demo_24f_160x120.mp4"


def build_net(device: str, weights: Path):
    """SRVGG ×4 with weights written to ``weights`` (also what RealESRGANer loads)."""
    import torch

    from utils.compat import install_torchvision_shim

    install_torchvision_shim()
    from realesrgan.archs.srvgg_arch import SRVGGNetCompact

    net = SRVGGNetCompact(num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=16, upscale=4, act_type="prelu")
    try:
        from engine.catalog import CATALOG
        from engine.ncnn_convert import import_bundled

        import_bundled(CATALOG["realesr-animevideov3-x2"], weights)
        source = "realesr-animevideov3 (bundled)"
    except Exception as exc:  # noqa: BLE001 - the timing does not depend on the weights
        torch.manual_seed(0)
        torch.save({"params_ema": net.state_dict()}, weights)
        source = f"random weights ({exc.__class__.__name__})"
    net.load_state_dict(torch.load(weights, weights_only=True)["params_ema"])
    return net.eval().to(device), source


def official_loop(tools: ff.FfmpegTools, src: Path, out: Path, weights: Path, net, device: str,
                  frames: int) -> int:
    """The official script's structure: per-frame RealESRGANer.enhance between two ffmpeg pipes, one thread."""
    from realesrgan import RealESRGANer

    info = probe_video(src, VideoLimits(2**34, 1e6, 10**7, 10**9), tools)
    upsampler = RealESRGANer(scale=4, model_path=str(weights), model=net, tile=0, tile_pad=10, pre_pad=0, half=False,
                             device=device)
    reader = subprocess.Popen([tools.ffmpeg, "-loglevel", "error", "-i", str(src), "-f", "rawvideo", "-pix_fmt",
                               "rgb24", "-"], stdout=subprocess.PIPE)
    w, h = info.width * 2, info.height * 2
    writer = subprocess.Popen([tools.ffmpeg, "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
                               "-s", f"{w}x{h}", "-framerate", str(info.fps), "-i", "-", "-i", str(src), "-map",
                               "0:v", "-map", "1:a?", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "copy",
                               str(out)], stdin=subprocess.PIPE)
    n = 0
    size = info.width * info.height * 3
    while n < frames:
        buf = reader.stdout.read(size)
        if len(buf) < size:
            break
        img = np.frombuffer(buf, np.uint8).reshape(info.height, info.width, 3)
        result, _ = upsampler.enhance(img, outscale=2)
        writer.stdin.write(result.tobytes())
        n += 1
    reader.kill()
    writer.stdin.close()
    writer.wait()
    return n


def engine_enhancer(weights_dir: Path, device: str, precision: str, batch: int):
    """The app's own frame enhancer (engine.processor.make_frame_enhancer) on the offline ×2 anime-video model."""
    from config import Config
    from engine.model_manager import ModelManager
    from engine.processor import EnhanceSettings, make_frame_enhancer

    manager = ModelManager(Config.from_env(env={}, dotenv_path=None, weights_dir=weights_dir))
    settings = EnhanceSettings(model="realesr-animevideov3-x2", outscale=2, tile="auto", device=device,
                               precision=precision, batch_size=batch)
    return make_frame_enhancer(manager, settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    parser.add_argument("--frames", type=int, default=24, help="frames to process (the clip is cut to this)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    tools = ff.find_tools()
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "w.pth"
        net, source = build_net(args.device, weights)
        clip = Path(tmp) / "clip.mp4"  # the same N frames for both: a stream copy of the first N frames + audio
        subprocess.run([tools.ffmpeg, "-loglevel", "error", "-y", "-i", str(args.input), "-frames:v",
                        str(args.frames), "-c", "copy", str(clip)], check=True)
        info = probe_video(clip, VideoLimits(2**34, 1e6, 10**7, 10**9), tools)
        frames = info.frames

        official_loop(tools, clip, Path(tmp) / "warm.mp4", weights, net, args.device, 2)  # warm-up (allocations)
        t0 = time.perf_counter()
        n_official = official_loop(tools, clip, Path(tmp) / "official.mp4", weights, net, args.device, frames)
        t_official = time.perf_counter() - t0

        settings = VideoSettings(batch_frames=args.batch, segment_frames=240, crf=23)
        enhancer = engine_enhancer(Path(tmp) / "weights", args.device, args.precision, args.batch)
        enhancer([np.zeros((info.height, info.width, 3), np.uint8)])  # load + warm-up, as for the official loop
        t0 = time.perf_counter()
        result = upscale_video(clip, Path(tmp) / "engine.mp4", enhancer, settings,
                               limits=VideoLimits(2**34, 1e6, 10**7, 10**9),
                               options=VideoRunOptions(ffmpeg=tools))
        t_engine = time.perf_counter() - t0

    fps_official, fps_engine = n_official / t_official, result.frames / t_engine
    print(f"clip: {args.input.name} {info.width}x{info.height} x2, {frames} frames; model: SRVGG ({source}); "
          f"device: {args.device}; ffmpeg: {tools.source} {tools.version}")
    print(f"official per-frame loop: {fps_official:7.2f} frames/s  ({t_official:.1f} s)")
    print(f"engine.video (batch {args.batch}, {args.precision}):  {fps_engine:7.2f} frames/s  ({t_engine:.1f} s, incl. probe+mux)")
    print(f"ratio engine/official: {fps_engine / fps_official:.2f}x")


if __name__ == "__main__":
    main()
