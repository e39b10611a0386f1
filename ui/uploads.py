"""Uploads and job folders: header-first validation, zip extraction that can't escape, per-job folders.

Every uploaded image is checked on its *header* (format allow-list PNG/JPEG/WebP/TIFF/BMP, pixel and byte caps)
before a single pixel is decoded, so a 50000×50000 PNG is refused at once. Zip archives are unpacked member by
member into a fresh folder: names are reduced to safe file names (no ``..``, no absolute paths, no links), only
image members are kept, and the number of members and the total unpacked size are capped. Results go to a
per-job folder under ``config.output_dir``; scratch files go to a per-job folder under ``config.temp_dir`` that
is removed when the job ends.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from engine.errors import InputTooLargeError, InvalidInputError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")
MAX_ZIP_MEMBERS = 500


def upload_path(value: object) -> Path | None:
    """The local path of an uploaded file, from a Gradio payload (FileData dict), a path string, or None.

    Gradio has already checked that an uploaded path lies in its own upload folder before a handler sees it.
    """
    if value is None:
        return None
    if isinstance(value, Mapping):
        raw = value.get("path")
        return Path(str(raw)) if raw else None
    if isinstance(value, (str, Path)):
        return Path(value)
    raw = getattr(value, "path", None) or getattr(value, "name", None)
    return Path(str(raw)) if raw else None


def upload_name(value: object, default: str = "image.png") -> str:
    """The file name the user uploaded (``orig_name``), made safe; ``default`` when unknown."""
    from utils.validation import sanitize_filename

    name = None
    if isinstance(value, Mapping):
        name = value.get("orig_name") or (Path(str(value["path"])).name if value.get("path") else None)
    elif isinstance(value, (str, Path)):
        name = Path(value).name
    return sanitize_filename(str(name), default=Path(default).stem) if name else default


def check_image_upload(path: str | Path, config) -> "object":
    """Check an uploaded image's header against the allow-list and the limits, without decoding it.

    Returns:
        The :class:`utils.validation.ImageHeader` (format, width, height, mode).

    Raises:
        InputTooLargeError: over ``config.max_input_pixels`` or ``config.max_upload_mb``.
        UnsupportedFormatError: not PNG, JPEG, WebP, TIFF or BMP (judged from the content).
        InvalidInputError: empty, damaged or unreadable.
    """
    from utils.validation import check_image_header

    try:
        return check_image_header(Path(path), max_pixels=config.max_input_pixels, max_bytes=config.max_upload_bytes)
    except OSError as exc:
        raise InvalidInputError("The uploaded file could not be read; please upload it again.") from exc


# ------------------------------------------------------------------------------------------------ job folders
def new_output_dir(config, kind: str = "image") -> Path:
    """A fresh folder for one job's results: ``output_dir/web/<kind>-<date>-<time>-<random>``.

    Expired and over-cap job folders are swept first (:mod:`engine.retention`).

    Raises:
        DiskFullError: the results' disk is nearly full even after the sweep.
    """
    from engine.retention import WEB_JOBS, check_free_space

    check_free_space(config)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = Path(config.output_dir) / WEB_JOBS / f"{kind}-{stamp}-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True, exist_ok=False)
    return folder


@contextlib.contextmanager
def temp_job_dir(config, kind: str = "job") -> Iterator[Path]:
    """A scratch folder under ``config.temp_dir`` for one job, removed (with its contents) when the job ends."""
    root = Path(config.temp_dir)
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"{kind}-{uuid.uuid4().hex}"
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_stale_temp_dirs(config, max_age_seconds: float = 24 * 3600) -> int:
    """Delete job scratch folders older than ``max_age_seconds`` left by a crash. Returns how many were removed."""
    root = Path(config.temp_dir)
    if not root.is_dir():
        return 0
    cutoff = time.time() - max_age_seconds
    removed = 0
    for child in root.iterdir():
        try:
            if child.is_dir() and not child.is_symlink() and child.stat().st_mtime < cutoff:
                shutil.rmtree(child, ignore_errors=True)
                removed += 1
        except OSError:
            continue
    return removed


# ------------------------------------------------------------------------------------------------ zip archives
@dataclass(frozen=True)
class ZipContents:
    """What :func:`extract_images` kept and what it left out (with reasons)."""

    images: tuple[Path, ...]
    skipped: tuple[str, ...]


def extract_images(archive: str | Path, dest: str | Path, *, max_total_bytes: int,
                   max_members: int = MAX_ZIP_MEMBERS) -> ZipContents:
    """Unpack the image members of a zip into ``dest`` safely.

    Member names are reduced to a safe single file name (directory parts are joined with ``_``), so nothing can
    be written outside ``dest`` (zip-slip); symbolic links, folders, hidden and non-image members are skipped;
    sizes are checked on the declared sizes *and* while copying, so a zip bomb stops at ``max_total_bytes``.

    Raises:
        InvalidInputError: not a zip archive, or damaged.
        InputTooLargeError: more than ``max_members`` entries, or more than ``max_total_bytes`` unpacked.
    """
    from utils.validation import sanitize_filename

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidInputError("This file is not a valid zip archive.") from exc
    images: list[Path] = []
    skipped: list[str] = []
    written = 0
    with zf:
        members = zf.infolist()
        if len(members) > max_members:
            raise InputTooLargeError(f"The zip holds {len(members)} entries; the limit is {max_members}. "
                                     "Split it into smaller archives.")
        declared = sum(m.file_size for m in members)
        if declared > max_total_bytes:
            raise InputTooLargeError(f"The zip unpacks to {declared / 2**20:.0f} MB; the limit is "
                                     f"{max_total_bytes / 2**20:.0f} MB.")
        used: set[str] = set()
        for member in members:
            raw = member.filename.replace("\\", "/")
            parts = [p for p in raw.split("/") if p not in ("", ".", "..")]
            if member.is_dir() or not parts:
                continue
            is_link = (member.external_attr >> 16) & 0o170000 == 0o120000
            if is_link:
                skipped.append(f"{parts[-1]}: links are not extracted")
                continue
            if any(p.startswith(".") or p == "__MACOSX" for p in parts):
                continue
            if Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append(f"{parts[-1]}: not an image")
                continue
            name = sanitize_filename("_".join(parts))
            stem, suffix = Path(name).stem, Path(name).suffix
            counter = 1
            while name.lower() in used:
                name = f"{stem}_{counter}{suffix}"
                counter += 1
            used.add(name.lower())
            target = dest / name
            try:
                with zf.open(member) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > max_total_bytes:
                            raise InputTooLargeError(f"The zip unpacks to more than {max_total_bytes / 2**20:.0f} "
                                                     "MB; the limit was reached while extracting.")
                        out.write(chunk)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, RuntimeError) as exc:
                target.unlink(missing_ok=True)
                skipped.append(f"{parts[-1]}: could not be extracted ({type(exc).__name__})")
                continue
            images.append(target)
    return ZipContents(tuple(images), tuple(skipped))


def write_zip(files: Sequence[Path], archive: Path, root: Path | None = None) -> Path:
    """Store ``files`` in a new zip (names relative to ``root``, else bare names); written then moved into place."""
    archive = Path(archive)
    partial = archive.with_name(f".{archive.name}.part")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in files:
            arcname = str(Path(path).relative_to(root)) if root is not None else Path(path).name
            zf.write(path, arcname)
    partial.replace(archive)
    return archive


def dir_size_bytes(folder: str | Path) -> int:
    """Total size of the regular files under ``folder`` (0 when missing)."""
    total = 0
    root = Path(folder)
    if not root.is_dir():
        return 0
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
    return total


def human_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
