"""Real-ESRGAN Ultimate entry point.

``python main.py`` launches the web UI; subcommands ``enhance``, ``analyze``, ``video`` and ``models`` run the
same engine from the command line. This module only parses arguments, wires objects together and turns engine
errors into messages and exit codes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("realesrgan_ultimate")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# ---------------------------------------------------------------------------------------------- parsing
def build_parser() -> argparse.ArgumentParser:
    from engine.catalog import FACE_MODELS, SR_MODELS

    parser = argparse.ArgumentParser(prog="main.py", description="Real-ESRGAN Ultimate: sharper images and video.")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command")

    ui = sub.add_parser("ui", help="launch the web UI (the default)")
    _add_server_args(ui)
    _add_server_args(parser)

    enhance = sub.add_parser("enhance", help="upscale images")
    enhance.add_argument("inputs", nargs="+", help="image files or folders")
    enhance.add_argument("-o", "--output", required=True, help="output file (one input) or folder")
    enhance.add_argument("--model", default="auto", choices=("auto",) + SR_MODELS)
    enhance.add_argument("--scale", type=float, default=None, help="outscale, 1 to 8 (default: the model's)")
    size = enhance.add_mutually_exclusive_group()
    size.add_argument("--width", type=int, help="target width in pixels (height keeps the aspect)")
    size.add_argument("--height", type=int, help="target height in pixels")
    size.add_argument("--max-side", type=int, help="longest output side in pixels")
    enhance.add_argument("--tile", default="auto", help="tile size in pixels, 0 for none, or auto")
    enhance.add_argument("--tile-overlap", default=None, help="context shared by tiles in pixels, or auto")
    enhance.add_argument("--denoise-strength", type=float, default=None, help="0..1 (realesr-general-x4v3)")
    enhance.add_argument("--face-enhance", action="store_true")
    enhance.add_argument("--face-model", default=None, choices=FACE_MODELS)
    enhance.add_argument("--face-strength", type=float, default=None, help="0..1 (default 0.8)")
    enhance.add_argument("--only-center-face", action="store_true")
    enhance.add_argument("--save-face-crops", action="store_true")
    enhance.add_argument("--force-faces", action="store_true", help="restore faces even on anime content")
    enhance.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    enhance.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps")
    enhance.add_argument("--format", dest="output_format", default="auto",
                         choices=("auto", "png", "jpg", "webp", "tiff"))
    enhance.add_argument("--quality", type=int, default=None, help="1..100 for jpg/webp")
    enhance.add_argument("--alpha", dest="alpha_mode", default=None, choices=("model", "bicubic"))
    enhance.add_argument("--no-metadata", action="store_true", help="do not copy EXIF/ICC to the output")
    enhance.add_argument("--auto", action="store_true", help="let the advisor choose settings for each image")
    enhance.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    enhance.add_argument("--skip-existing", action="store_true")
    enhance.add_argument("--json", action="store_true", help="print one JSON object per image")

    analyze = sub.add_parser("analyze", help="recommend settings for an image")
    analyze.add_argument("image")
    analyze.add_argument("--device", default=None)
    analyze.add_argument("--json", action="store_true")

    video = sub.add_parser("video", help="upscale a video")
    video.add_argument("input")
    video.add_argument("-o", "--output", required=True)
    video.add_argument("--model", default="realesr-animevideov3", choices=SR_MODELS)
    video.add_argument("--scale", type=float, default=2.0)
    video.add_argument("--codec", default="h264", choices=("h264", "h265", "vp9"))
    video.add_argument("--crf", type=int, default=18)
    video.add_argument("--preset", default="medium")
    video.add_argument("--fps", default=None, help="output frame rate, e.g. 24000/1001 (default: same)")
    video.add_argument("--face-enhance", action="store_true")
    video.add_argument("--batch-frames", type=int, default=4)
    video.add_argument("--tile", default="auto")
    video.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    video.add_argument("--device", default=None)
    video.add_argument("--resume", action="store_true", help="continue an interrupted run")
    video.add_argument("--json", action="store_true")

    models = sub.add_parser("models", help="list, download, verify or import models")
    msub = models.add_subparsers(dest="models_command", required=True)
    mlist = msub.add_parser("list")
    mlist.add_argument("--json", action="store_true")
    mdown = msub.add_parser("download")
    mdown.add_argument("name", nargs="*", help="catalog names (see: models list)")
    mdown.add_argument("--all", action="store_true")
    msub.add_parser("verify")
    msub.add_parser("import-bundled")
    return parser


def _add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--share", action="store_true", default=None)
    p.add_argument("--auth", default=None, help="user:password for the web UI")
    p.add_argument("--allow-share-without-auth", action="store_true", default=None)


# ---------------------------------------------------------------------------------------------- commands
def cmd_models(args, config) -> int:
    from tqdm import tqdm

    from engine.model_manager import ModelManager

    manager = ModelManager(config)
    if args.models_command == "list":
        rows = [s.as_dict() for s in manager.list_models()]
        if args.json:
            _print_json(rows)
        else:
            for r in rows:
                where = r["path"] or ("(converted on first use)" if r["available"] else "")
                _out(f"{r['name']:28} {r['kind']:8} x{r['scale']}  "
                     f"{'available' if r['available'] else 'missing  '}  {r['source']:11} {where}")
        return EXIT_OK
    if args.models_command == "download":
        from engine.catalog import OFFICIAL_MODELS

        names = list(OFFICIAL_MODELS) if args.all else list(args.name)
        if not names:
            _err("Name a model to download, or pass --all.")
            return EXIT_USAGE
        failed = 0
        for name in names:
            with tqdm(desc=name, unit="B", unit_scale=True, disable=None) as bar:
                def progress(done, total, bar=bar):
                    bar.total = total
                    bar.n = done
                    bar.refresh()
                try:
                    _out(f"{name}: {manager.download(name, progress)}")
                except Exception as exc:  # reported per model; the loop goes on
                    failed += 1
                    _err(f"{name}: {_message(exc)}")
        return EXIT_FAILED if failed else EXIT_OK
    if args.models_command == "verify":
        bad = 0
        for status in manager.list_models():
            ok, message = manager.verify(status.name)
            if status.path or ok:
                bad += 0 if ok else 1
                _out(f"{status.name:28} {message}")
        return EXIT_FAILED if bad else EXIT_OK
    if args.models_command == "import-bundled":
        for path in manager.import_all_bundled():
            _out(f"imported {path}")
        return EXIT_OK
    return EXIT_USAGE


def cmd_ui(args, config) -> int:
    from ui.app import launch

    return launch(config)


_FORMAT_BY_SUFFIX = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp", ".tif": "tiff", ".tiff": "tiff"}


def _settings_from_args(args):
    from engine.processor import EnhanceSettings

    tile = args.tile if args.tile == "auto" else int(args.tile)
    values = dict(model=args.model, outscale=args.scale, target_width=args.width, target_height=args.height,
                  max_side=args.max_side, tile=tile,
                  tile_overlap=(None if args.tile_overlap is None else
                                args.tile_overlap if args.tile_overlap == "auto" else int(args.tile_overlap)),
                  denoise_strength=args.denoise_strength, face_enhance=args.face_enhance,
                  face_strength=args.face_strength, face_model=args.face_model,
                  only_center_face=args.only_center_face, save_face_crops=args.save_face_crops,
                  force_face_enhance=args.force_faces, precision=args.precision, device=args.device or "auto",
                  output_format=args.output_format, quality=args.quality, alpha_mode=args.alpha_mode,
                  keep_metadata=not args.no_metadata)
    return EnhanceSettings(**{k: v for k, v in values.items() if v is not None})


def cmd_enhance(args, config) -> int:
    """Enhance files or folders. Exit status 1 when any image failed."""
    from tqdm import tqdm

    from engine.errors import InvalidSettingsError
    from engine.model_manager import ModelManager
    from engine.processor import (collect_inputs, enhance_image_direct, output_format_for, output_path_for,
                                  save_result, settings_from_advice)

    try:
        base = _settings_from_args(args)
    except (InvalidSettingsError, ValueError) as exc:
        _err(f"Invalid settings: {exc}")
        return EXIT_USAGE
    manager = ModelManager(config)
    pairs = collect_inputs(args.inputs, recursive=args.recursive)
    if not pairs:
        _err("No images found in the given inputs (PNG, JPEG, WebP, TIFF or BMP).")
        return EXIT_USAGE
    output = Path(args.output)
    single_file = len(pairs) == 1 and not Path(args.inputs[0]).is_dir() and output.suffix != ""
    advisor = None
    if args.auto:
        from engine.intelligent_enhancer import IntelligentEnhancer

        advisor = IntelligentEnhancer(model_manager=manager, config=config)
    failures = 0
    for path, rel in tqdm(pairs, desc="images", unit="img", disable=args.json or len(pairs) == 1 or None):
        record = {"input": str(path)}
        try:
            settings = base
            if advisor is not None:
                advice = advisor.get_intelligent_settings(path)
                settings = settings_from_advice(advice["settings"], base)
                record["advisor"] = advice["reasoning"]
            if single_file:
                target = output_path_for(path, output)
                fmt = _FORMAT_BY_SUFFIX.get(output.suffix.lower())
                if fmt is None:
                    raise ValueError(f"Unknown output extension {output.suffix!r}: use .png, .jpg, .webp or .tiff.")
            else:
                target, fmt = None, None
            if target is not None and args.skip_existing and target.exists():
                record.update(skipped=True, output=str(target))
                _report(args, record)
                continue
            with tqdm(total=100, desc=path.name, unit="%", leave=False, disable=args.json or None) as bar:
                def progress(fraction, message, bar=bar):
                    bar.n = int(fraction * 100)
                    bar.set_postfix_str(message[:40])
                    bar.refresh()
                result = enhance_image_direct(path, settings, manager, progress, config=config)
            if target is None:
                fmt = settings.output_format if settings.output_format != "auto" else output_format_for(result)
                target = output_path_for(path, output / rel.with_suffix("." + fmt))
                if args.skip_existing and target.exists():
                    record.update(skipped=True, output=str(target))
                    _report(args, record)
                    continue
            saved, metrics, notes = save_result(result, target, original_bytes=path.stat().st_size,
                                                output_format=fmt)
            report = result.report()
            record.update(output=str(saved), model=report["model"], scale=report["scale"], tile=report["tile"],
                          device=report["device"], precision=report["precision"], seconds=report["seconds"],
                          warnings=report["warnings"] + notes, faces_detected=report["faces_detected"],
                          faces_restored=report["faces_restored"], detector=report["detector"], metrics=metrics,
                          ok=True)
        except Exception as exc:
            failures += 1
            if not _is_expected(exc):
                logger.exception("unexpected error on %s", path)
            record.update(ok=False, error=_message(exc))
        _report(args, record)
    if len(pairs) > 1 and not args.json:
        _out(f"{len(pairs) - failures} successful, {failures} failed")
    return EXIT_FAILED if failures else EXIT_OK


def _report(args, record: dict) -> None:
    if args.json:
        _print_json(record)
    elif record.get("skipped"):
        _out(f"skipped {record['input']} (output exists)")
    elif record.get("ok"):
        _out(f"{record['input']} -> {record['output']}  [{record['model']} on {record['device']} "
             f"{record['precision']}, {record['seconds']:.1f} s]")
        for warning in record.get("warnings", []):
            _out(f"  warning: {warning}")
    else:
        _err(f"{record['input']}: {record['error']}")


def cmd_analyze(args, config) -> int:
    from engine.intelligent_enhancer import IntelligentEnhancer
    from engine.model_manager import ModelManager

    advisor = IntelligentEnhancer(model_manager=ModelManager(config), config=config, device=args.device)
    advice = advisor.get_intelligent_settings(args.image)
    if args.json:
        _print_json(advice)
        return EXIT_OK
    a, s = advice["analysis"], advice["settings"]
    _out(f"{args.image}: {a['resolution']}, {a['content_type']} ({a['confidence']:.0%}), {a['faces']} face(s), "
         f"noise {a['noise_level']:.2f}, JPEG artefacts {a['jpeg_artifacts']:.2f}, blur {a['blur']:.2f}")
    _out(f"Recommended: model {s['model']}, scale x{s['scale']:g}, precision {s['precision']}, "
         f"tile {'auto (' + str(s['tile']) + ')' if s['auto_tile'] else s['tile']}, "
         f"face enhance {'on' if s['face_enhance'] else 'off'}, denoise {s['denoise_strength']:.2f}")
    for reason in advice["reasoning"]:
        _out(f"  - {reason}")
    return EXIT_OK


def cmd_video(args, config) -> int:
    from fractions import Fraction

    from tqdm import tqdm

    from engine.model_manager import ModelManager
    from engine.processor import EnhanceSettings, make_frame_enhancer
    from engine.video import VideoLimits, VideoSettings, upscale_video

    settings = EnhanceSettings(model=args.model, outscale=args.scale, face_enhance=args.face_enhance,
                               tile=args.tile if args.tile == "auto" else int(args.tile), precision=args.precision,
                               device=args.device or "auto", batch_size=max(1, args.batch_frames))
    manager = ModelManager(config)
    enhancer = make_frame_enhancer(manager, settings, config)
    video_settings = VideoSettings(codec=args.codec, crf=args.crf, preset=args.preset,
                                   fps=Fraction(args.fps) if args.fps else None, batch_frames=args.batch_frames)
    limits = VideoLimits.from_config(config)
    with tqdm(unit="frame", disable=args.json or None) as bar:
        def progress(p, bar=bar):
            bar.total = p.total
            bar.n = p.frames_done
            bar.set_postfix_str(f"{p.fps:.2f} fps, ETA {p.eta_seconds or 0:.0f} s")
            bar.refresh()
        result = upscale_video(args.input, args.output, enhancer, video_settings, limits=limits, progress=progress,
                               resume=args.resume)
    record = {"input": args.input, "output": str(result.output), "frames": result.frames,
              "seconds": round(result.seconds, 2), "fps": round(result.fps, 3), "model": args.model,
              "warnings": list(result.warnings)}
    if args.json:
        _print_json(record)
    else:
        _out(f"{args.input} -> {result.output}: {result.frames} frames in {result.seconds:.1f} s "
             f"({result.fps:.2f} fps)")
        for warning in result.warnings:
            _out(f"  warning: {warning}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- plumbing
def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=None, default=str) + "\n")


def _message(exc: BaseException) -> str:
    from engine.errors import EngineError

    if isinstance(exc, (EngineError, ValueError, FileNotFoundError, PermissionError)):
        return str(exc)
    return f"unexpected error ({type(exc).__name__}); see the log for details"


def load_config(args):
    from config import Config

    overrides = {}
    for field in ("host", "port", "share", "auth", "allow_share_without_auth", "device", "log_level"):
        value = getattr(args, field, None)
        if value is not None:
            overrides[field] = value.upper() if field == "log_level" else value
    return Config.from_env(**overrides)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args)
    except ValueError as exc:
        _err(f"Configuration error: {exc}")
        return EXIT_USAGE
    from engine.models.loader import check_safe_environment
    from utils.logger import setup_logging

    config.ensure_directories()
    setup_logging(config.log_file, config.log_level)
    if config.cpu_memory_reuse:
        from utils.allocator import reuse_freed_memory

        reuse_freed_memory()  # before any worker thread exists: those would keep arenas of their own
    try:
        check_safe_environment()
        handler = {None: cmd_ui, "ui": cmd_ui, "enhance": cmd_enhance, "analyze": cmd_analyze,
                   "video": cmd_video, "models": cmd_models}[args.command]
        return handler(args, config)
    except KeyboardInterrupt:
        _err("Interrupted.")
        return 130
    except Exception as exc:
        logger.debug("command failed", exc_info=True)
        if not _is_expected(exc):
            logger.exception("unexpected error")
        _err(f"Error: {_message(exc)}")
        return EXIT_FAILED


def _is_expected(exc: BaseException) -> bool:
    from engine.errors import EngineError

    return isinstance(exc, (EngineError, ValueError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
