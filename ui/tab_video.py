"""Tab 2, Video: upload a clip, choose model/scale/codec, upscale it frame by frame with progress (frames, fps,
time left) and Cancel, then preview and download. The audio and subtitles are kept.

Shown only when the video engine (``engine.video``) and ffmpeg are available and ``config.enable_video`` is set;
otherwise the tab says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import gradio as gr

from engine.settings import EnhanceSettings
from ui.errors import friendly_errors
from ui.form import sr_model_options
from ui.jobs import CancelToken, device_slot, watch_job
from ui.uploads import VIDEO_SUFFIXES, human_bytes, new_output_dir, upload_name, upload_path

if TYPE_CHECKING:
    from engine.video import VideoSettings

logger = logging.getLogger(__name__)

DEFAULT_VIDEO_MODEL = "realesr-animevideov3"
CODEC_CHOICES = (("H.264 (plays everywhere)", "h264"), ("H.265 (smaller files)", "h265"), ("VP9 (WebM)", "vp9"))
PRESET_CHOICES = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")

#: The settings the tab's widgets edit, by the field each sets: these of :class:`~engine.settings.EnhanceSettings`
#: (the one settings model) ...
ENHANCE_KEYS: tuple[str, ...] = ("model", "outscale", "face_enhance")
#: ... and these of :class:`~engine.video.VideoSettings`.
VIDEO_KEYS: tuple[str, ...] = ("codec", "crf", "preset", "batch_frames")
#: The order of the settings widgets in the Run handler's inputs (:attr:`VideoTab.settings_widgets`).
SETTINGS_KEYS: tuple[str, ...] = ENHANCE_KEYS + VIDEO_KEYS


def video_unavailable_reason(config) -> str | None:
    """None when videos can be processed here, else a sentence saying why not."""
    if not getattr(config, "enable_video", True):
        return "Video processing is turned off on this server (REALESRGAN_ENABLE_VIDEO)."
    try:
        from engine import video  # noqa: F401
        from engine.ffmpeg import find_tools
        from engine.processor import make_frame_enhancer  # noqa: F401

        find_tools()
    except ImportError:
        return "Video processing isn't available in this installation."
    except Exception as exc:  # ffmpeg missing or broken
        return f"Video processing isn't available: {exc}"
    return None


def describe_video(services, path: str | Path) -> str:
    from engine.video import VideoLimits, probe_video

    info = probe_video(path, VideoLimits.from_config(services.config))
    audio = f"{len(info.audio_streams)} audio track(s)" if info.audio_streams else "no audio"
    return (f"{info.width}×{info.height}, {float(info.fps):.3g} fps, {info.duration:.1f} s, {info.frames} frames, "
            f"{audio}, {human_bytes(info.size_bytes)}.")


def _whole_number(value: object) -> object:
    """A slider's 18.0 as 18; anything else unchanged (the settings object refuses what is wrong)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def settings_from_widgets(values: Sequence[object]) -> tuple[EnhanceSettings, VideoSettings]:
    """The tab's widget values, in :data:`SETTINGS_KEYS` order, as the engine's settings. Pure.

    Returns:
        ``(settings, video_settings)``: the enhancement (built through the one settings model, every other
        setting at its default) and the encoding.

    Raises:
        InvalidSettingsError: a value out of range (the message names the setting).
    """
    from engine.video import VideoSettings

    if len(values) != len(SETTINGS_KEYS):
        raise ValueError(f"expected {len(SETTINGS_KEYS)} values ({', '.join(SETTINGS_KEYS)}), got {len(values)}")
    named = dict(zip(SETTINGS_KEYS, values))
    settings = EnhanceSettings.from_mapping({key: named[key] for key in ENHANCE_KEYS}, coerce=True)
    video_settings = VideoSettings(**{key: _whole_number(named[key]) for key in VIDEO_KEYS})
    return settings, video_settings


def upscale_file(services, path: str | Path, settings: EnhanceSettings, video_settings: VideoSettings, *,
                 name: str, progress: Callable[[object], None] | None = None, cancel=None):
    """Upscale one uploaded video into a fresh job folder.

    Args:
        services: the app's services (config, model manager, device limiter).
        path: the uploaded video.
        settings: how each frame is enhanced (model, scale, faces, ...).
        video_settings: how the result is encoded (codec, quality, speed, frames per batch).
        name: the upload's original file name (the output is named after it).
        progress: called with the engine's video progress while frames are processed.
        cancel: an event; setting it stops the job and removes the partial output.

    Returns:
        The engine's ``VideoResult``.
    """
    from engine.processor import make_frame_enhancer
    from engine.video import VideoLimits, upscale_video

    config = services.config
    enhancer = make_frame_enhancer(services.model_manager, settings, config)
    suffix = ".webm" if video_settings.codec == "vp9" else ".mp4"
    output = new_output_dir(config, "video") / f"{Path(name).stem or 'video'}_upscaled{suffix}"
    with device_slot(services):
        return upscale_video(path, output, enhancer, video_settings, limits=VideoLimits.from_config(config),
                             progress=progress, cancel=cancel)


@dataclass
class VideoTab:
    video: gr.Video | None = None
    info: gr.Markdown | None = None
    model: gr.Dropdown | None = None
    outscale: gr.Slider | None = None
    codec: gr.Dropdown | None = None
    crf: gr.Slider | None = None
    preset: gr.Dropdown | None = None
    face_enhance: gr.Checkbox | None = None
    batch_frames: gr.Slider | None = None
    run: gr.Button | None = None
    cancel: gr.Button | None = None
    result: gr.Video | None = None
    summary: gr.Markdown | None = None
    download: gr.DownloadButton | None = None
    token: gr.State | None = None
    unavailable: str | None = None

    @property
    def settings_widgets(self) -> list[gr.components.Component]:
        """The widgets of the settings, in :data:`SETTINGS_KEYS` order."""
        return [getattr(self, key) for key in SETTINGS_KEYS]


def render(services) -> VideoTab:
    reason = video_unavailable_reason(services.config)
    if reason:
        gr.Markdown(f"### {reason}\nImages, batches and presets work as usual.", elem_id="video-unavailable")
        return VideoTab(unavailable=reason)
    gr.Markdown("Upscale a video clip frame by frame. The sound and subtitles are copied unchanged. Long clips "
                "take a while on a CPU: try a few seconds first.")
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            video = gr.Video(label="Your video (MP4, MKV, MOV, WebM)", sources=["upload"], elem_id="video-input")
            info = gr.Markdown("", padding=True)
            model = gr.Dropdown(sr_model_options(),
                                value=DEFAULT_VIDEO_MODEL, label="Model",
                                info="realesr-animevideov3 is small and fast; the others are slower.")
            scale = gr.Slider(1, 4, value=2, step=0.5, label="Upscale factor")
            with gr.Accordion("Encoding", open=False):
                codec = gr.Dropdown(list(CODEC_CHOICES), value="h264", label="Codec")
                crf = gr.Slider(0, 51, value=18, step=1, label="Quality (CRF)",
                                info="Lower means better quality and bigger files; 18 looks lossless to most eyes.")
                preset = gr.Dropdown(list(PRESET_CHOICES), value="medium", label="Encoder speed")
                batch_frames = gr.Slider(1, 16, value=4, step=1, label="Frames per batch")
                face_enhance = gr.Checkbox(value=False, label="Restore faces in every frame (slow)")
            with gr.Row():
                run = gr.Button("Upscale video", variant="primary", scale=3, elem_id="video-run")
                cancel = gr.Button("Cancel", variant="stop", scale=1)
        with gr.Column(scale=6):
            result = gr.Video(label="Result", interactive=False, elem_id="video-result")
            summary = gr.Markdown("", padding=True)
            download = gr.DownloadButton("Download the video", visible=False, variant="primary")
    return VideoTab(video, info, model, scale, codec, crf, preset, face_enhance, batch_frames, run, cancel, result,
                    summary, download, gr.State(CancelToken()))


def listen(tab: VideoTab, services) -> None:
    if tab.unavailable:
        return

    def on_upload(payload):
        path = upload_path(payload)
        if path is None:
            return ""
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            raise gr.Error("Upload an MP4, MKV, MOV, WebM or AVI video.", title="Unsupported file")
        with friendly_errors("probe video"):
            return describe_video(services, path)

    tab.video.upload(on_upload, inputs=[tab.video], outputs=[tab.info], preprocess=False,
                     api_visibility="private", concurrency_id="analyze", concurrency_limit=2)

    def on_run(payload, token: CancelToken, request: gr.Request, *values, progress=gr.Progress()):
        path = upload_path(payload)
        if path is None:
            raise gr.Error("Upload a video first.", title="No video")
        with friendly_errors("video"):
            settings, video_settings = settings_from_widgets(values)
        event = token.start()

        def report(p) -> None:
            if p.total:
                eta = f", about {p.eta_seconds:.0f} s left" if p.eta_seconds is not None else ""
                progress(min(1.0, p.frames_done / p.total),
                         desc=f"{p.stage}: frame {p.frames_done} of {p.total} ({p.fps:.2f} fps{eta})")
            else:
                progress(None, desc=str(p.stage))

        with friendly_errors("video"), watch_job(services, event, request):
            outcome = upscale_file(services, path, settings, video_settings, name=upload_name(payload, "video.mp4"),
                                   progress=report, cancel=event)
        text = (f"**Done:** {outcome.frames} frames at {outcome.width}×{outcome.height} in {outcome.seconds:.1f} s "
                f"({outcome.fps:.2f} fps).")
        if outcome.warnings:
            from utils.errors import scrub_paths

            text += "\n\n" + "\n".join(f"- {scrub_paths(w)}" for w in outcome.warnings)
        return str(outcome.output), text, gr.update(value=str(outcome.output), visible=True)

    run_event = tab.run.click(
        on_run, inputs=[tab.video, tab.token, *tab.settings_widgets],
        outputs=[tab.result, tab.summary, tab.download], preprocess=False, api_visibility="private",
        concurrency_id="device", show_progress_on=[tab.summary])

    def on_cancel(token: CancelToken):
        token.cancel()
        gr.Info("Cancelling the video… the partial output is removed.")

    tab.cancel.click(on_cancel, inputs=[tab.token], api_visibility="private", queue=False, cancels=[run_event])
