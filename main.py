"""Real-ESRGAN Ultimate entry point.

``python main.py`` launches the web UI; subcommands ``enhance``, ``analyze``, ``video`` and ``models`` run the
same engine from the command line. This module only parses arguments and wires objects together; messages and
exit codes for errors come from the one error table (:mod:`utils.errors`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from utils.errors import EXIT_CANCELLED, EXIT_FAILED, EXIT_OK, EXIT_USAGE, error_kind, is_expected, user_message

logger = logging.getLogger("realesrgan_ultimate")


# ---------------------------------------------------------------------------------------------- parsing
#: The settings the ``video`` subcommand offers, and where it starts (a fast model at ×2 suits most clips).
VIDEO_SETTINGS = ("model", "outscale", "face_enhance", "tile", "precision", "device")
VIDEO_DEFAULTS = {"model": "realesr-animevideov3", "outscale": 2.0}


def build_parser() -> argparse.ArgumentParser:
    from engine.models.user_catalog import KINDS
    from engine.settings import add_cli_arguments

    parser = argparse.ArgumentParser(prog="main.py", description="Real-ESRGAN Ultimate: sharper images and video.")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command")

    ui = sub.add_parser("ui", help="launch the web UI (the default)")
    _add_server_args(ui)
    _add_server_args(parser)

    enhance = sub.add_parser("enhance", help="upscale images")
    enhance.add_argument("inputs", nargs="+", help="image files or folders")
    enhance.add_argument("-o", "--output", default="results",
                         help="output file (one input) or folder (default: results, as the official inference script)")
    add_cli_arguments(enhance)
    enhance.add_argument("--auto", action="store_true",
                         help="let the advisor choose settings for each image (the flags you give still win)")
    enhance.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    enhance.add_argument("--skip-existing", action="store_true")
    enhance.add_argument("--json", action="store_true", help="print one JSON object per image")

    analyze = sub.add_parser("analyze", help="recommend settings for an image")
    analyze.add_argument("image")
    analyze.add_argument("--device", default=None)
    analyze.add_argument("--scale", type=float, default=None, help="the scale you want (default: the advisor's)")
    analyze.add_argument("--json", action="store_true")

    video = sub.add_parser("video", help="upscale a video")
    video.add_argument("input")
    video.add_argument("-o", "--output", default=None,
                       help="the file to write: .mp4, .m4v, .mov, .mkv or .webm (default: results/NAME_out.mp4, "
                            "as the official video script)")
    add_cli_arguments(video, VIDEO_SETTINGS, defaults=VIDEO_DEFAULTS)
    video.add_argument("--codec", default="h264", choices=("h264", "h265", "vp9"))
    video.add_argument("--crf", type=int, default=18)
    video.add_argument("--preset", default="medium")
    video.add_argument("--fps", default=None, help="output frame rate, e.g. 24000/1001 (default: same)")
    video.add_argument("--batch-frames", type=int, default=4)
    video.add_argument("--segment-frames", type=int, default=None,
                       help="frames per resumable segment (default 240); --resume continues after the last one")
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
    madd = msub.add_parser("add", help="import your own model (.pth, .pt, .ckpt, .safetensors) from a path or URL")
    madd.add_argument("source", metavar="PATH|URL")
    madd.add_argument("--name", default=None, help="the name to list it under (default: the file name)")
    madd.add_argument("--kind", default="general", choices=KINDS, help="what it is for (the advisor offers it so)")
    madd.add_argument("--sha256", default=None, help="refuse the file unless its SHA-256 is this")
    madd.add_argument("--license", default="", help="its licence, shown beside it")
    madd.add_argument("--json", action="store_true")
    mremove = msub.add_parser("remove", help="remove an imported model and its file")
    mremove.add_argument("name")
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
                kind = r["kind"] if r["tag"] is None else f"{r['tag']}*"  # * marks your own models
                _out(f"{r['name']:28} {kind:8} x{r['scale']}  "
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
                    _err(f"{name}: {user_message(exc)}")
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
    if args.models_command == "add":
        from engine.downloader import DownloadPolicy

        policy = DownloadPolicy(timeout=config.download_timeout, retries=config.download_retries)
        model = manager.user_catalog.import_model(args.source, name=args.name, kind=args.kind, sha256=args.sha256,
                                                  license=args.license, policy=policy)
        if args.json:
            _print_json(model.as_dict())
        else:
            _out(f"imported {model.name}: {model.architecture} x{model.scale}, {model.input_channels}->"
                 f"{model.output_channels} channels, sha256 {model.sha256}")
        return EXIT_OK
    if args.models_command == "remove":
        manager.user_catalog.remove(args.name)
        manager.unload_model(args.name)
        _out(f"removed {args.name}")
        return EXIT_OK
    return EXIT_USAGE


def cmd_ui(args, config) -> int:
    from ui.app import launch

    return launch(config)


def cmd_enhance(args, config) -> int:
    """Enhance files or folders through the one batch runner. Exit status 1 when any image failed."""
    from tqdm import tqdm

    from engine.errors import InvalidSettingsError
    from engine.model_manager import ModelManager
    from engine.processor import BatchJob, BatchServices, EnhanceSettings, collect_inputs, run_batch
    from engine.settings import explicit_from_cli

    explicit = explicit_from_cli(args)
    try:
        base = EnhanceSettings.from_mapping(explicit)
    except InvalidSettingsError as exc:
        _err(f"Invalid settings: {exc}")
        return EXIT_USAGE
    items = collect_inputs(args.inputs, recursive=args.recursive)
    if not items:
        _err("No images found in the given inputs (PNG, JPEG, WebP, TIFF or BMP).")
        return EXIT_USAGE
    output = Path(args.output)
    single_file = len(items) == 1 and not Path(args.inputs[0]).is_dir() and output.suffix != ""
    job = BatchJob(settings=base, explicit=explicit, auto=args.auto, output_dir=None if single_file else output,
                   output_file=output if single_file else None, skip_existing=args.skip_existing)
    services = BatchServices(ModelManager(config), config)
    quiet = args.json or None
    with tqdm(total=len(items) * 100, desc="images", unit="%", disable=quiet) as bar:
        def progress(index, total, name, fraction, bar=bar):
            bar.n = int((index + fraction) * 100)
            bar.set_postfix_str(name[:40])
            bar.refresh()

        report = run_batch(items, job, services, progress=progress,
                           on_item=lambda item: _report(args, _record(item)))
    if len(items) > 1 and not args.json:
        _out(report.summary())
    return EXIT_FAILED if report.failures else EXIT_OK


def _record(item) -> dict:
    """One image's line of output: what ran, where it went, or why it failed."""
    record = {"input": str(item.input), "ok": item.ok}
    if item.skipped:
        return record | {"skipped": True, "output": str(item.output)}
    if not item.ok:
        return record | {"error": item.error}
    r = item.report
    record |= {key: r[key] for key in ("model", "scale", "tile", "device", "precision", "seconds", "warnings",
                                      "faces_detected", "faces_restored", "detector", "metrics")}
    record["output"] = str(item.output)
    if item.reasons:
        record["advisor"] = list(item.reasons)
    return record


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
    from engine.intelligent_enhancer import IntelligentEnhancer, design_dict
    from engine.model_manager import ModelManager

    advisor = IntelligentEnhancer(model_manager=ModelManager(config), config=config, device=args.device)
    advice = advisor.advise(args.image, scale=args.scale)
    if args.json:
        _print_json(design_dict(advice))
        return EXIT_OK
    a, s = advice.analysis, advice.settings
    _out(f"{args.image}: {a['resolution']}, {a['content_type']} ({a['confidence']:.0%}), {a['faces']} face(s), "
         f"noise {a['noise_level']:.2f}, JPEG artefacts {a['jpeg_artifacts']:.2f}, blur {a['blur']:.2f}")
    tile = f"auto ({a['optimal_tile'] or 'whole image'})" if s.tile == "auto" else s.tile
    _out(f"Recommended: model {s.model}, scale x{s.outscale:g}, precision {s.precision}, tile {tile}, "
         f"face enhance {'on' if s.face_enhance else 'off'}, denoise {s.denoise_strength:.2f}")
    for reason in advice.reasons:
        _out(f"  - {reason}")
    _out(f"Memory: {_memory_line(args.image, s, advisor.model_manager, config)}")
    return EXIT_OK


def _memory_line(image, settings, model_manager, config) -> str:
    """The memory plan of the recommended job (its peak and what it is made of), or why it cannot run."""
    from engine.errors import EngineError
    from engine.inference.pipeline import plan_input

    try:
        _model, size, plan = plan_input(image, settings, model_manager, config)
    except EngineError as exc:
        return str(exc)
    return f"{size[0]}×{size[1]} output, {plan.describe()}; {plan.budget_bytes / 2 ** 30:.1f} GB available"


def video_settings_from_args(args):
    """The ``video`` command's (EnhanceSettings, VideoSettings) from its parsed arguments."""
    from fractions import Fraction

    from engine.processor import EnhanceSettings
    from engine.video import VideoSettings

    from engine.settings import explicit_from_cli

    settings = EnhanceSettings.from_mapping(explicit_from_cli(args, VIDEO_DEFAULTS)
                                            | {"batch_size": max(1, min(64, args.batch_frames))})
    segments = {"segment_frames": args.segment_frames} if args.segment_frames is not None else {}
    video_settings = VideoSettings(codec=args.codec, crf=args.crf, preset=args.preset,
                                   fps=Fraction(args.fps) if args.fps else None, batch_frames=args.batch_frames,
                                   **segments)
    return settings, video_settings


def cmd_video(args, config) -> int:
    from tqdm import tqdm

    from engine.model_manager import ModelManager
    from engine.processor import make_frame_enhancer
    from engine.video import VideoLimits, VideoRunOptions, upscale_video

    settings, video_settings = video_settings_from_args(args)
    output = Path(args.output) if args.output else Path("results") / f"{Path(args.input).stem}_out.mp4"
    manager = ModelManager(config)
    enhancer = make_frame_enhancer(manager, settings, config)  # carries the settings that key --resume
    limits = VideoLimits.from_config(config)
    with tqdm(unit="frame", disable=args.json or None) as bar:
        def progress(p, bar=bar):
            bar.total = p.total
            bar.n = p.frames_done
            bar.set_postfix_str(f"{p.fps:.2f} fps, ETA {p.eta_seconds or 0:.0f} s")
            bar.refresh()
        result = upscale_video(args.input, output, enhancer, video_settings, limits=limits,
                               options=VideoRunOptions(resume=args.resume), progress=progress)
    record = {"input": args.input, "output": str(result.output), "frames": result.frames,
              "seconds": round(result.seconds, 2), "fps": round(result.fps, 3), "model": settings.model,
              "resumed_frames": result.resumed_frames, "warnings": list(result.warnings)}
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


def _use_user_models() -> None:
    """Let ``--model`` offer the models imported into the configured weights dir (argparse checks choices)."""
    from config import Config
    from engine.catalog import use_user_catalog
    from engine.models.user_catalog import user_catalog_for

    try:
        use_user_catalog(user_catalog_for(Config.from_env().weights_dir))
    except ValueError:
        pass  # a configuration error: load_config reports it


def load_config(args):
    from config import Config

    overrides = {}
    for field in ("host", "port", "share", "auth", "allow_share_without_auth", "device", "log_level"):
        value = getattr(args, field, None)
        if value is not None:
            overrides[field] = value.upper() if field == "log_level" else value
    return Config.from_env(**overrides)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed (the user's models are among the model choices)."""
    _use_user_models()
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run a parsed command line; returns the exit status (errors become messages on stderr)."""
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
        return EXIT_CANCELLED
    except Exception as exc:
        logger.debug("command failed", exc_info=True)
        if not is_expected(exc):
            logger.exception("unexpected error")
        _err(f"Error: {user_message(exc)}")
        return error_kind(exc).exit_code


def exit_now(code: int) -> None:
    """End a finished command line run without the interpreter's teardown (freeing torch's modules and a heap
    of gigabytes takes ~2 s on a 2-core CPU). Every output is already written, fsynced and closed by then; the
    logs and the standard streams are flushed here. The web UI exits the normal way (Gradio's exit handlers)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    parsed = parse_args()
    status = run(parsed)
    if parsed.command in ("enhance", "analyze", "video", "models"):  # the web UI exits the normal way
        exit_now(status)
    sys.exit(status)
