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
    enhance.add_argument("--tile-overlap", type=int, default=None)
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
    mdown.add_argument("name", nargs="?")
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

        names = list(OFFICIAL_MODELS) if args.all else [args.name]
        if names == [None]:
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


def cmd_enhance(args, config) -> int:
    from cli_commands import run_enhance

    return run_enhance(args, config)


def cmd_analyze(args, config) -> int:
    from cli_commands import run_analyze

    return run_analyze(args, config)


def cmd_video(args, config) -> int:
    from cli_commands import run_video

    return run_video(args, config)


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
    from engine.model_manager import check_safe_environment
    from utils.logger import setup_logging

    config.ensure_directories()
    setup_logging(config.log_file, config.log_level)
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
