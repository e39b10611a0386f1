"""Tab 3, Batch: many images (or zip archives of images) at once, with the advisor's settings per image or the
Image tab's settings; a gallery of results, "X successful, Y failed" with reasons, and one zip to download.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import gradio as gr

from engine.processor import BatchInput, BatchItem, BatchJob, BatchServices, run_batch
from ui import form as form_mod
from ui.errors import friendly_errors
from ui.jobs import CancelToken, device_slot, watch_job
from ui.uploads import (check_image_upload, extract_images, new_output_dir, temp_job_dir, upload_name, upload_path,
                        write_zip)
from utils.errors import user_message

logger = logging.getLogger(__name__)

MAX_BATCH_FILES = 500


@dataclass(frozen=True)
class BatchOutcome:
    folder: Path
    archive: Path | None
    outputs: tuple[tuple[Path, str], ...]  # (file, caption)
    failures: tuple[tuple[str, str], ...]  # (input name, reason)
    summary: str


def batch_job(settings: Mapping[str, object], auto: bool, folder: Path) -> BatchJob:
    """The job for the form's settings: with ``auto`` the advisor chooses per image, and the values the user
    changed on the form still win."""
    engine_settings = form_mod.to_enhance_settings(settings)
    explicit = form_mod.explicit_settings(settings) if auto else engine_settings.as_dict()
    return BatchJob(settings=engine_settings, explicit=explicit, auto=auto, output_dir=folder)


def enhance_uploads(services, uploads: Sequence[tuple[Path, str]], settings: Mapping[str, object], auto: bool, *,
                    progress: Callable[[int, int, str, float], None] | None = None, cancel=None) -> BatchOutcome:
    """Enhance uploaded images and zip archives.

    Args:
        services: the app's services.
        uploads: (local path, name the user gave it) pairs; ``.zip`` files are unpacked (images only).
        settings: the form's settings dict.
        auto: let the advisor choose per image (the values changed on the form still win).
        progress: ``(index, total, name, fraction of this image)``.
        cancel: a ``threading.Event`` that stops the batch.
    """
    config = services.config
    failures: list[tuple[str, str]] = []
    with temp_job_dir(config, "batch") as staging:
        inputs: list[Path] = []
        used: set[str] = set()

        def stage(path: Path, name: str) -> None:
            try:
                check_image_upload(path, config)
            except Exception as exc:  # a refused file is reported, the rest of the batch goes on
                failures.append((name, user_message(exc)))
                return
            from utils.validation import sanitize_filename

            safe = sanitize_filename(name)
            stem, suffix = Path(safe).stem, Path(safe).suffix or ".png"
            candidate, counter = f"{stem}{suffix}", 1
            while candidate.lower() in used:
                candidate = f"{stem}_{counter}{suffix}"
                counter += 1
            used.add(candidate.lower())
            target = staging / "in" / candidate
            target.parent.mkdir(exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copyfile(path, target)
            inputs.append(target)

        for path, name in uploads:
            if Path(name).suffix.lower() == ".zip":
                try:
                    contents = extract_images(path, staging / f"zip-{len(used)}-{Path(name).stem}"[:200],
                                              max_total_bytes=max(config.max_upload_bytes * 20, 1 << 30))
                except Exception as exc:
                    failures.append((name, user_message(exc)))
                    continue
                failures.extend((name, reason) for reason in contents.skipped)
                for image in contents.images:
                    stage(image, image.name)
            else:
                stage(path, name)
        if len(inputs) > MAX_BATCH_FILES:
            raise gr.Error(f"{len(inputs)} images is more than the {MAX_BATCH_FILES} a batch may hold; split it.")
        folder = new_output_dir(config, "batch")
        items: tuple[BatchItem, ...] = ()
        if inputs:
            job = batch_job(settings, auto, folder)
            engine_services = BatchServices(services.model_manager, config, services.advisor,
                                            slot=lambda: device_slot(services),  # other users get turns
                                            time_limit=config.job_time_limit_seconds)  # refused, not cut off
            items = run_batch([BatchInput(p, Path(p.name)) for p in inputs], job, engine_services,
                              progress=progress, cancel=cancel).items
    outputs = tuple((Path(i.output), f"{i.input.name} → {Path(i.output).name}")
                    for i in items if i.ok and i.output is not None)
    failures.extend((i.input.name, _short(i.error)) for i in items if not i.ok)
    archive = write_zip([p for p, _ in outputs], folder / "enhanced_images.zip") if outputs else None
    summary = f"**{len(outputs)} successful, {len(failures)} failed**"
    if failures:
        summary += "\n\n" + "\n".join(f"- `{name}`: {reason}" for name, reason in failures)
    return BatchOutcome(folder, archive, outputs, tuple(failures), summary)


def _short(error: str | None) -> str:
    from utils.errors import scrub_paths

    return scrub_paths(error or "unknown error")


@dataclass
class BatchTab:
    files: gr.File
    auto: gr.Checkbox
    run: gr.Button
    cancel: gr.Button
    gallery: gr.Gallery
    summary: gr.Markdown
    download: gr.DownloadButton
    token: gr.State


def render(services, initial_settings: Mapping[str, object]) -> BatchTab:
    gr.Markdown("Enhance many images at once. Add image files or **.zip** archives of images; results appear "
                "below and can be downloaded together as one zip.")
    with gr.Row(equal_height=False):
        with gr.Column(scale=4):
            files = gr.File(file_count="multiple", file_types=["image", ".zip"], label="Images or zip archives",
                            elem_id="batch-files")
            auto = gr.Checkbox(value=bool(initial_settings.get("auto_settings", True)),
                               label="Choose the settings for each image automatically",
                               info="Off: every image uses the settings of the Image tab.")
            with gr.Row():
                run = gr.Button("Enhance all", variant="primary", elem_id="batch-run", scale=3)
                cancel = gr.Button("Cancel", variant="stop", scale=1)
        with gr.Column(scale=6):
            summary = gr.Markdown("", elem_id="batch-summary", padding=True)
            gallery = gr.Gallery(label="Results", columns=4, height=420, elem_id="batch-gallery",
                                 buttons=["download", "fullscreen"])
            download = gr.DownloadButton("Download all as zip", visible=False, variant="primary")
    return BatchTab(files, auto, run, cancel, gallery, summary, download, gr.State(CancelToken()))


def listen(tab: BatchTab, services, form: form_mod.SettingsForm) -> None:
    def on_run(payloads, auto, token: CancelToken, request: gr.Request, *values, progress=gr.Progress()):
        uploads = [(upload_path(p), upload_name(p)) for p in (payloads or []) if upload_path(p) is not None]
        if not uploads:
            raise gr.Error("Add some images or a zip archive first.", title="Nothing to do")
        event = token.start()

        def report(index: int, total: int, name: str, fraction: float) -> None:
            done = min(total, index + fraction)
            progress(done / max(total, 1), desc=f"Image {min(index + 1, total)} of {total}: {name} "
                                                 f"({fraction:.0%})")

        with friendly_errors("batch"):
            settings = form_mod.widget_values_to_settings(values)
            with watch_job(services, event, request):
                outcome = enhance_uploads(services, uploads, settings, bool(auto), progress=report, cancel=event)
        gallery = [(str(p), caption) for p, caption in outcome.outputs]
        download = (gr.update(value=str(outcome.archive), visible=True) if outcome.archive
                    else gr.update(value=None, visible=False))
        return gallery, outcome.summary, download

    run_event = tab.run.click(on_run, inputs=[tab.files, tab.auto, tab.token, *form.components],
                              outputs=[tab.gallery, tab.summary, tab.download], preprocess=False,
                              api_visibility="private", concurrency_id="device", show_progress_on=[tab.summary])

    def on_cancel(token: CancelToken):
        token.cancel()
        gr.Info("Cancelling the batch… the current image finishes its step first.")

    tab.cancel.click(on_cancel, inputs=[tab.token], api_visibility="private", queue=False, cancels=[run_event])
