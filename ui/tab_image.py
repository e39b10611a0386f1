"""Tab 1, Image Enhancement: upload → the advisor's analysis and recommendation → settings → Enhance (with
progress and Cancel) → before/after slider, metrics and the download.

The work is done by :func:`analyze_file` and :func:`enhance_file`, plain functions of paths and dicts that the
Gradio handlers, the named API endpoints (``/enhance``, ``/analyze``) and the tests share.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import gradio as gr
import numpy as np

from engine.advisor.estimates import record_job
from engine.errors import InputTooLargeError
from engine.processor import EnhanceResult, enhance_image_direct, save_result
from engine.settings import Advice
from ui import form as form_mod
from ui.errors import friendly_errors
from ui.jobs import CancelToken, device_slot, gradio_progress, watch_job
from ui.uploads import check_image_upload, new_output_dir, upload_name, upload_path

logger = logging.getLogger(__name__)

PREVIEW_MAX_SIDE = 1280  # the slider shows previews at most this large; the download is full size

INTRO = ("Drop a photo or drawing below (or paste one with Ctrl+V). The app looks at it and suggests settings; "
         "press **Enhance** to upscale it, then drag the slider to compare before and after.")


# ------------------------------------------------------------------------------------------------ the work
@dataclass(frozen=True)
class ImageJob:
    """A finished enhancement as the UI shows it."""

    output: Path
    before: np.ndarray  # HxWxC uint8 preview of the input, resized to the preview of the output
    after: np.ndarray  # HxWxC uint8 preview of the output
    report: dict
    summary: str
    warnings: tuple[str, ...] = field(default_factory=tuple)


def analyze_file(services, path: str | Path, scale: float | None = None, cancel=None) -> dict:
    """Validate the upload's header, then ask the advisor. Returns the advisor's JSON-safe dict.

    ``cancel`` (a ``threading.Event``) stops the analysis between its stages with ``CancelledError``.

    Raises:
        InputTooLargeError / UnsupportedFormatError / InvalidInputError: the upload is refused.
        QueueFullError: the device's slots and wait line are full.
    """
    header = check_image_upload(path, services.config)
    with device_slot(services):  # decoding and analysing are admitted like enhancement (QueueFullError: busy)
        advice = services.advisor.advise(str(path), scale=scale, cancel=cancel)
    result = json.loads(json.dumps(advice.as_dict(), default=str))  # JSON-safe (numpy numbers, tuples)
    result["memory"] = memory_summary(services, path, advice.settings)
    result["time_limit"] = time_limit_summary(services, header, advice.settings)
    return result


def memory_summary(services, path: str | Path, settings) -> str:
    """The recommended job's memory plan in words (its peak and parts), or why it cannot run here."""
    from engine.errors import EngineError
    from engine.inference.pipeline import plan_input
    from utils.errors import scrub_paths

    try:
        _model, size, plan = plan_input(str(path), settings, services.model_manager, services.config)
    except EngineError as exc:
        return scrub_paths(str(exc))
    return f"{size[0]}×{size[1]} output, {plan.describe()}"


def time_limit_summary(services, header, settings) -> str | None:
    """Why Enhance with ``settings`` would be refused for taking longer than the per-job time limit, and what to
    change (the check :func:`enhance_file` makes); None when it fits or nothing was measured."""
    try:
        _check_time(services, header, settings)
    except InputTooLargeError as exc:
        return f"Enhance would be refused. {exc}"
    return None


def advice_markdown(advice: Mapping) -> str:
    """The analysis and the recommendation in plain words."""
    a, s = advice.get("analysis", {}), advice.get("settings", {})
    content = {"photo": "a photo", "anime": "anime / a drawing"}.get(str(a.get("content_type")),
                                                                     str(a.get("content_type", "unknown")))
    lines = [f"**What the app sees:** {content} ({a.get('resolution', '?')}, confidence "
             f"{float(a.get('confidence', 0)):.0%}), {a.get('faces', 0)} face(s), noise "
             f"{float(a.get('noise_level', 0)):.2f}, JPEG artefacts {float(a.get('jpeg_artifacts', 0)):.2f}.",
             f"**Recommended:** model `{s.get('model', 'auto')}`, ×{s.get('outscale') or '?'}"
             + (", restore faces" if s.get("face_enhance") else "")
             + (f", denoise {float(s['denoise_strength']):.2f}" if s.get("denoise_strength") is not None else "")]
    if a.get("estimated_seconds") is not None:
        lines[-1] += f" — about {float(a['estimated_seconds']):.0f} s on {a.get('device', 'this machine')}."
    if advice.get("memory"):
        lines.append(f"**Memory:** {advice['memory']}.")
    if advice.get("time_limit"):
        lines.append(f"**Time limit:** {advice['time_limit']}")
    reasons = advice.get("reasoning") or []
    if reasons:
        lines.append("**Why:**\n" + "\n".join(f"- {r}" for r in reasons))
    return "\n\n".join(lines)


def enhance_file(services, path: str | Path, settings: Mapping[str, object], *, name: str | None = None,
                 progress: Callable[[float, str], None] | None = None, cancel=None) -> ImageJob:
    """Enhance one uploaded image with a settings dict and save it into a fresh job folder.

    Args:
        services: the app's :class:`ui.services.Services`.
        path: the uploaded file.
        settings: a settings dict (see :data:`engine.settings_manager.SETTINGS_SCHEMA`); missing keys default.
        name: the file name the user uploaded (for the output's name).
        progress: ``(fraction, message)`` callback.
        cancel: a ``threading.Event``; setting it stops the job with ``CancelledError``.

    Returns:
        An :class:`ImageJob` with the saved file, previews and the report.

    Raises:
        InputTooLargeError: over the upload limits, or estimated over the per-job time limit (before it queues).
    """
    config = services.config
    path = Path(path)
    header = check_image_upload(path, config)
    enhance_settings = form_mod.to_enhance_settings(settings)
    _check_time(services, header, enhance_settings)
    report = progress or (lambda _fraction, _message: None)
    with device_slot(services, notify=lambda text: report(0.0, text)):
        started = time.perf_counter()
        result = enhance_image_direct(str(path), enhance_settings, services.model_manager, report, config=config,
                                      cancel=cancel)
    stem = Path(name or path.name).stem or "image"
    folder = new_output_dir(config, "image")
    from engine.processor import output_format_for

    fmt = output_format_for(result)
    ext = {"jpeg": "jpg"}.get(fmt, fmt)
    saved, metrics, notes = save_result(result, folder / f"{stem}_enhanced.{ext}",
                                        original_bytes=path.stat().st_size)
    record_job(config, result, time.perf_counter() - started)  # the advisor's estimates learn from every run
    from utils.errors import scrub_paths

    full_report = result.report() | {"metrics": metrics, "output_name": saved.name,
                                     "warnings": [scrub_paths(w) for w in (*result.warnings, *notes)]}
    before, after = _previews(path, result, config)
    return ImageJob(output=Path(saved), before=before, after=after, report=full_report,
                    summary=result_markdown(full_report), warnings=tuple(full_report["warnings"]))


def _check_time(services, header, settings) -> None:
    """Refuse at once, from the header, a job estimated over the per-job time limit (the model the settings route
    to, at what was measured here; nothing runs to estimate) rather than stop it when the limit passes.

    Raises:
        InputTooLargeError: over the limit; the message says what to change.
    """
    from engine.inference.planning import route_model

    if services.advisor is None:
        return
    outscale = settings.requested_scale(header.width, header.height)
    model = route_model(settings.model, outscale, services.model_manager.is_available)[0]
    services.advisor.check_time_limit(model, header.width, header.height, services.config.job_time_limit_seconds,
                                      outscale=outscale)


def _display_rgb(pixels: np.ndarray) -> np.ndarray:
    from utils.image_io import to_8bit

    p = to_8bit(pixels)
    if p.shape[2] == 1:
        p = np.repeat(p, 3, axis=2)
    elif p.shape[2] == 2:
        p = np.concatenate([np.repeat(p[:, :, :1], 3, axis=2), p[:, :, 1:]], axis=2)
    return np.ascontiguousarray(p)


def _previews(path: Path, result: EnhanceResult, config) -> tuple[np.ndarray, np.ndarray]:
    """Same-size 8-bit previews of input (resized with bicubic, as a plain resize would) and output."""
    import cv2

    from engine.processor import load_input

    out_w, out_h = result.size
    factor = min(1.0, PREVIEW_MAX_SIDE / max(out_w, out_h))
    w, h = max(1, round(out_w * factor)), max(1, round(out_h * factor))
    after = _display_rgb(result.pixels)
    if (w, h) != (out_w, out_h):
        after = cv2.resize(after, (w, h), interpolation=cv2.INTER_AREA)
    before = _display_rgb(load_input(str(path), config).pixels)
    before = cv2.resize(before, (w, h), interpolation=cv2.INTER_CUBIC)
    if before.shape[2] != after.shape[2]:  # keep both RGB when only one has alpha
        before, after = before[:, :, :3], after[:, :, :3]
    return np.ascontiguousarray(before), np.ascontiguousarray(after)


def metric_rows(m: Mapping) -> list[tuple[str, str]]:
    """The quality metrics worth a line in the result table (those computed; the reasons for the others are in
    the metrics' own warnings)."""
    def number(key: str) -> float | None:
        value = m.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    rows = []
    if number("lr_psnr") is not None:
        ssim = f", SSIM {number('lr_ssim'):.3f}" if number("lr_ssim") is not None else ""
        rows.append(("Fidelity to the input", f"PSNR {number('lr_psnr'):.1f} dB{ssim} (output shrunk back)"))
    if number("niqe_input") is not None and number("niqe_output") is not None:
        rows.append(("NIQE (lower is better)", f"{number('niqe_input'):.2f} → {number('niqe_output'):.2f}"))
    if number("lpips") is not None:
        rows.append(("LPIPS to the input (lower is closer)", f"{number('lpips'):.3f}"))
    if number("identity_similarity") is not None:
        rows.append(("Face identity kept (1 = same)", f"{number('identity_similarity'):.2f}"))
    return rows


def result_markdown(report: Mapping) -> str:
    m = report.get("metrics", {})
    size_in = "×".join(str(v) for v in report.get("input_size", []))
    size_out = "×".join(str(v) for v in report.get("output_size", []))
    rows = [
        ("Size", f"{size_in} → {size_out} (×{report.get('scale')})"),
        ("File size", f"{m.get('original_filesize', 'n/a')} → {m.get('enhanced_filesize', 'n/a')}"
                      + (f" ({m['size_change']})" if m.get("size_change") not in (None, "n/a") else "")),
        ("Time", f"{report.get('seconds', 0):.1f} s"),
        ("Model", f"{report.get('model')}"),
        ("Device", f"{report.get('device')} · {report.get('precision')} · tile {report.get('tile') or 'none'}"),
    ]
    if report.get("faces_detected"):
        rows.append(("Faces", f"{report.get('faces_restored', 0)} restored of {report['faces_detected']} found"))
    rows += metric_rows(m)
    text = "| Result | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    warnings = report.get("warnings") or []
    if warnings:
        text += "\n\n**Notes:**\n" + "\n".join(f"- {w}" for w in warnings)
    return text


def api_settings(raw: object) -> dict:
    """The /enhance API's ``settings`` argument (dict or JSON text) → the settings it names, validated.

    Only the keys given are returned, so everything else takes the engine's defaults (for example the model's
    native scale when ``outscale`` is left out).

    Raises:
        InvalidSettingsError: not a JSON object, or a value of the wrong type or range.
    """
    from engine.errors import InvalidSettingsError
    from engine.settings_manager import validate_settings

    if raw in (None, "", {}):
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidSettingsError(f"settings must be a JSON object: {exc.msg}.") from None
    if not isinstance(raw, Mapping):
        raise InvalidSettingsError("settings must be a JSON object such as {\"model\": \"auto\", \"outscale\": 2}.")
    values = dict(raw)
    validated, _warnings = validate_settings(values)
    return {key: validated[key] for key in values if key in validated}


# ------------------------------------------------------------------------------------------------ compare models
COMPARE_MIN, COMPARE_MAX = 2, 3


@dataclass(frozen=True)
class ModelComparison:
    """The same input through two or three models, at one output size.

    ``previews`` are (model, HxWx3 uint8 preview) pairs of one size, in the order asked; ``reports`` the engine's
    report of each run (time, size, metrics).
    """

    previews: tuple[tuple[str, np.ndarray], ...]
    reports: tuple[dict, ...]

    def markdown(self) -> str:
        """A table: model, time, output size and the quality metrics of each run."""
        lines = ["| Model | Time | Output | Quality |", "|---|---|---|---|"]
        for report in self.reports:
            size = "×".join(str(v) for v in report.get("output_size", []))
            quality = "; ".join(f"{k} {v}" for k, v in metric_rows(report.get("metrics", {}))) or "—"
            lines.append(f"| `{report.get('model')}` | {float(report.get('seconds', 0)):.1f} s | {size} | "
                         f"{quality} |")
        return "\n".join(lines)


def compare_models(services, path: str | Path, settings: Mapping[str, object], models: list[str], *,
                   progress: Callable[[float, str], None] | None = None, cancel=None) -> ModelComparison:
    """Run one uploaded image through each of ``models`` with the same settings and output size.

    The output size is the settings' (or the largest native scale among the models), so models of different
    scales line up on the slider. Nothing is saved.

    Raises:
        InvalidSettingsError: fewer than two or more than three models, or a model that is not offered.
    """
    from engine.errors import InvalidSettingsError

    models = list(dict.fromkeys(m for m in models if m and m != "auto"))
    if not COMPARE_MIN <= len(models) <= COMPARE_MAX:
        raise InvalidSettingsError(f"Choose {COMPARE_MIN} or {COMPARE_MAX} different models to compare.")
    config = services.config
    path = Path(path)
    check_image_upload(path, config)
    base = form_mod.to_enhance_settings(settings)
    if base.requested_scale(1, 1) is None:
        base = base.replace(outscale=float(max(services.model_manager.spec(m).scale for m in models)))
    report = progress or (lambda _fraction, _message: None)
    results = []
    with device_slot(services, notify=lambda text: report(0.0, text)):
        for index, model in enumerate(models):
            def step(fraction: float, message: str, index=index, model=model) -> None:
                report((index + fraction) / len(models), f"{model}: {message}")

            results.append(enhance_image_direct(str(path), base.replace(model=model), services.model_manager,
                                                step, config=config, cancel=cancel))
    previews = tuple((model, _previews(path, result, config)[1][:, :, :3]) for model, result in zip(models, results))
    return ModelComparison(previews=previews, reports=tuple(json.loads(json.dumps(r.report(), default=str))
                                                             for r in results))


# ------------------------------------------------------------------------------------------------ the tab
@dataclass
class ImageTab:
    image: gr.Image
    advice: gr.Markdown
    apply: gr.Button
    recommended: gr.State
    form: form_mod.SettingsForm
    enhance: gr.Button
    cancel: gr.Button
    slider: gr.ImageSlider
    metrics: gr.Markdown
    download: gr.DownloadButton
    token: gr.State
    api_image: gr.Image
    api_settings: gr.JSON
    api_run: gr.Button
    api_result: gr.Image
    api_report: gr.JSON
    api_analyze: gr.Button
    api_advice: gr.JSON
    compare: "ComparePanel"


@dataclass
class ComparePanel:
    models: gr.Dropdown
    run: gr.Button
    gallery: gr.Gallery
    table: gr.Markdown


def render_compare() -> ComparePanel:
    with gr.Accordion("Compare models", open=False, elem_id="compare-panel") as panel:
        models = gr.Dropdown(form_mod.sr_model_options(), multiselect=True, max_choices=COMPARE_MAX, value=[],
                             label="Two or three models", elem_id="compare-models",
                             info="The same image and settings through each; the first two go on the slider.")
        run = gr.Button("Compare", elem_id="compare-button")
        gallery = gr.Gallery(label="Each model's result", columns=COMPARE_MAX, height=260, elem_id="compare-gallery")
        table = gr.Markdown("", elem_id="compare-metrics", padding=True)
    panel.expand(lambda: gr.update(choices=form_mod.sr_model_options()), outputs=[models], api_visibility="private",
                 queue=False)  # models imported since the page loaded
    return ComparePanel(models, run, gallery, table)


def render(services, initial_settings: Mapping[str, object]) -> ImageTab:
    gr.Markdown(INTRO)
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=320):
            image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"],
                             label="Your image (PNG, JPEG, WebP, TIFF or BMP)", height=340, elem_id="input-image")
            with gr.Group():
                advice = gr.Markdown("Upload an image to see what the app recommends.", elem_id="advice",
                                     padding=True)
                apply = gr.Button("Apply recommendations", interactive=False, size="sm", elem_id="apply-advice")
            recommended = gr.State(None)
            with gr.Row():
                enhance = gr.Button("Enhance", variant="primary", elem_id="enhance-button", scale=3)
                cancel = gr.Button("Cancel", variant="stop", elem_id="cancel-button", scale=1)
            with gr.Accordion("Settings", open=True):
                form = form_mod.render_form(initial_settings, services.model_manager,
                                            face_enabled=services.config.enable_face_enhancement)
        with gr.Column(scale=6, min_width=360):
            slider = gr.ImageSlider(label="Before / after — drag the handle to compare", type="numpy",
                                    format="png", interactive=False, elem_id="result-slider", max_height=640,
                                    buttons=["fullscreen"])
            metrics = gr.Markdown("", elem_id="result-metrics", padding=True)
            download = gr.DownloadButton("Download the full-size result", visible=False, variant="primary",
                                         elem_id="download-result")
            compare = render_compare()
    token = gr.State(CancelToken())

    # Named API endpoints (hidden widgets: the API takes the image, and optionally a settings object).
    with gr.Column(visible=False):
        api_image = gr.Image(type="filepath", image_mode=None, label="image")
        api_settings = gr.JSON(value={}, label="settings")
        api_run = gr.Button("api enhance")
        api_result = gr.Image(type="filepath", label="enhanced image")
        api_report = gr.JSON(label="report")
        api_analyze = gr.Button("api analyze")
        api_advice = gr.JSON(label="analysis")
    return ImageTab(image, advice, apply, recommended, form, enhance, cancel, slider, metrics, download, token,
                    api_image, api_settings, api_run, api_result, api_report, api_analyze, api_advice, compare)


def listen(tab: ImageTab, services) -> None:
    form_inputs = tab.form.components

    def on_upload(payload, request: gr.Request):
        path = upload_path(payload)
        if path is None:
            return "Upload an image to see what the app recommends.", None, gr.update(interactive=False)
        with friendly_errors("analyse"), watch_job(services, request=request) as watch:
            advice = analyze_file(services, path, cancel=watch.cancel)
        return advice_markdown(advice), advice, gr.update(interactive=True)

    tab.image.upload(on_upload, inputs=[tab.image], outputs=[tab.advice, tab.recommended, tab.apply],
                     preprocess=False, api_visibility="private", concurrency_id="analyze",
                     concurrency_limit=2, show_progress_on=[tab.advice])
    tab.image.clear(lambda: ("Upload an image to see what the app recommends.", None, gr.update(interactive=False)),
                    outputs=[tab.advice, tab.recommended, tab.apply], api_visibility="private", queue=False)

    def on_apply(advice, *values):
        if not advice:
            raise gr.Error("Upload an image first; the recommendation comes from its analysis.")
        with friendly_errors("apply recommendations"):
            current = form_mod.widget_values_to_settings(values)
            updated = form_mod.settings_from_recommendation(Advice.from_dict(advice), current)
        gr.Info("The recommended settings are in the form; press Enhance.")
        return form_mod.settings_to_widget_values(updated)

    tab.apply.click(on_apply, inputs=[tab.recommended, *form_inputs], outputs=form_inputs,
                    api_visibility="private", queue=False)

    def on_enhance(payload, token: CancelToken, request: gr.Request, *values, progress=gr.Progress()):
        path = required_upload(payload)
        event = token.start()
        with friendly_errors("enhance"):
            settings = form_mod.widget_values_to_settings(values)
            progress(0.0, desc="Starting")
            with watch_job(services, event, request):
                job = enhance_file(services, path, settings, name=upload_name(payload),
                                   progress=gradio_progress(progress), cancel=event)
            try:
                services.settings.save_settings(settings)
            except Exception as exc:  # remembering the settings is a convenience; the result is what matters
                logger.warning("could not save the last-used settings: %s", exc)
        for note in job.warnings:
            gr.Warning(note)
        return ((job.before, job.after), job.summary,
                gr.update(value=str(job.output), visible=True, label=f"Download {job.output.name}"))

    enhance_event = tab.enhance.click(
        on_enhance, inputs=[tab.image, tab.token, *form_inputs], outputs=[tab.slider, tab.metrics, tab.download],
        preprocess=False, api_visibility="private", concurrency_id="device", show_progress_on=[tab.slider])

    def on_cancel(token: CancelToken):
        token.cancel()
        gr.Info("Cancelling… the current step finishes first.")

    tab.cancel.click(on_cancel, inputs=[tab.token], outputs=None, api_visibility="private", queue=False,
                     cancels=[enhance_event])

    listen_compare(tab, services)

    # ---- named API endpoints
    def api_enhance(image, settings=None, request: gr.Request = None, progress=gr.Progress()):
        """Enhance an image. `settings` (optional) is a JSON object of settings (model, outscale, tile,
        denoise_strength, face_enhance, face_strength, precision, device, output_format, quality); anything left
        out takes its default. Returns the enhanced image file and a JSON report."""
        path = upload_path(image)
        if path is None:
            raise gr.Error("Send an image file.", title="No image")
        with friendly_errors("api enhance"):
            values = api_settings(settings)
            with watch_job(services, request=request) as watch:
                job = enhance_file(services, path, values, name=upload_name(image),
                                   progress=gradio_progress(progress), cancel=watch.cancel)
        return str(job.output), job.report

    tab.api_run.click(api_enhance, inputs=[tab.api_image, tab.api_settings],
                      outputs=[tab.api_result, tab.api_report], api_name="enhance", preprocess=False,
                      concurrency_id="device")

    def api_analyze(image, request: gr.Request):
        """Analyse an image and recommend settings: returns {"settings", "reasoning", "analysis"}."""
        path = upload_path(image)
        if path is None:
            raise gr.Error("Send an image file.", title="No image")
        with friendly_errors("api analyze"), watch_job(services, request=request) as watch:
            return analyze_file(services, path, cancel=watch.cancel)

    tab.api_analyze.click(api_analyze, inputs=[tab.api_image], outputs=[tab.api_advice], api_name="analyze",
                          preprocess=False, concurrency_id="analyze", concurrency_limit=2)


def required_upload(payload) -> str:
    """The uploaded image's path; a message that says what to do when there is none."""
    path = upload_path(payload)
    if path is None:
        raise gr.Error("Upload an image first (drag it onto the left box, or paste it).", title="No image")
    return path


def listen_compare(tab: ImageTab, services) -> None:
    panel = tab.compare

    def on_compare(payload, models, token: CancelToken, request: gr.Request, *values, progress=gr.Progress()):
        path = required_upload(payload)
        event = token.start()
        with friendly_errors("compare models"):
            settings = form_mod.widget_values_to_settings(values)
            with watch_job(services, event, request):  # the time limit, and a client gone, stop it like Enhance
                comparison = compare_models(services, path, settings, list(models or []),
                                            progress=gradio_progress(progress), cancel=event)
        (first, left), (second, right) = comparison.previews[:2]
        gr.Info(f"On the slider: {first} (left) and {second} (right).")
        return ((left, right), [(image, model) for model, image in comparison.previews], comparison.markdown())

    panel.run.click(on_compare, inputs=[tab.image, panel.models, tab.token, *tab.form.components],
                    outputs=[tab.slider, panel.gallery, panel.table], preprocess=False, api_visibility="private",
                    concurrency_id="device", show_progress_on=[tab.slider])
