"""Tab 5, System Info: devices and memory, versions, the model catalog with local status and downloads, importing
and removing your own models, and the disk used by weights and outputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import gradio as gr

from ui.errors import friendly_errors
from ui.uploads import dir_size_bytes, human_bytes

logger = logging.getLogger(__name__)

MODEL_COLUMNS = ["Model", "Kind", "Scale", "Status", "Size", "Licence", "What it is for"]


def system_markdown(services) -> str:
    from utils.gpu import system_info

    info = system_info()
    lines = ["### Devices", "| Device | Name | Memory free / total |", "|---|---|---|"]
    for dev in info.get("devices", []):
        memory = (f"{human_bytes(dev['free_bytes'])} / {human_bytes(dev['total_bytes'])}"
                  if dev.get("total_bytes") else "n/a")
        lines.append(f"| `{dev['name']}` | {dev['label']} | {memory} |")
    lines += ["", "### Software",
              f"- Python {info.get('python')} on {info.get('platform')}",
              f"- PyTorch {info.get('torch')}; CUDA "
              + (f"{info.get('cuda_version')} (cuDNN {info.get('cudnn_version')}), driver "
                 f"{info.get('driver_version') or 'n/a'}" if info.get("cuda_available") else "not available"),
              f"- CPU: {info.get('cpu_count')} threads ({info.get('cpu_threads')} used by PyTorch); RAM "
              f"{info.get('ram_available_gb')} GB free of {info.get('ram_total_gb')} GB"]
    try:
        import gradio

        lines.append(f"- Gradio {gradio.__version__}")
    except Exception:
        pass
    cfg = services.config
    lines += ["", "### Disk",
              f"- Model weights: {human_bytes(dir_size_bytes(cfg.weights_dir))}",
              f"- Results: {human_bytes(dir_size_bytes(cfg.output_dir))}",
              f"- Temporary files: {human_bytes(dir_size_bytes(cfg.temp_dir))}"]
    try:
        from engine.retention import usage

        held = usage(cfg)
        lines += [f"- Job folders (web results, uploads): {held['folders']}, {human_bytes(held['bytes'])} of at "
                  f"most {human_bytes(held['cap_bytes'])}; kept {cfg.retention_hours:g} h",
                  f"- Free on the results' disk: {human_bytes(held['free_bytes'])}"]
    except OSError as exc:
        logger.warning("disk usage could not be read: %s", exc)
    try:
        stats = services.limiter.stats()
        lines += ["", "### Queue", f"- {stats.running} job(s) running, {stats.waiting} waiting "
                                   f"(at most {stats.concurrency} at once per device, {stats.max_queue} in line)"]
    except Exception:
        pass
    return "\n".join(lines)


def model_rows(services) -> list[list[object]]:
    rows = []
    for s in services.model_manager.list_models():
        status = {"weights_dir": "Ready (downloaded)", "bundled": "Ready (offline copy)",
                  "package": "Ready (installed package)"}.get(s.source, "Not downloaded")
        if not s.available:
            status = "Not downloaded" if s.url else "Unavailable"
        kind = s.kind if s.tag is None else f"yours: {s.tag}"
        rows.append([s.name, kind, f"×{s.scale}", status, human_bytes(s.size_bytes) if s.size_bytes else "—",
                     s.license, s.description])
    return rows


def downloadable(services) -> list[str]:
    return [s.name for s in services.model_manager.list_models() if not s.available and s.url]


@dataclass
class SystemTab:
    info: gr.Markdown
    models: gr.Dataframe
    choice: gr.Dropdown
    download: gr.Button
    refresh: gr.Button
    status: gr.Markdown
    free: gr.Button
    own: "ImportPanel"


def free_space(services) -> str:
    """Run the retention sweep now; the sentence says what it removed."""
    from engine.retention import sweep

    report = sweep(services.config)
    return (f"Removed {report.removed} expired or over-cap job folder(s), {human_bytes(report.freed_bytes)}; "
            f"{report.kept} kept ({human_bytes(report.kept_bytes)}, the newest and any in use).")


def render(services) -> SystemTab:
    with gr.Row(equal_height=False):
        with gr.Column(scale=4):
            info = gr.Markdown("Loading…", elem_id="system-info", padding=True)
            with gr.Row():
                refresh = gr.Button("Refresh", size="sm")
                free = gr.Button("Free space now", size="sm", elem_id="free-space")
        with gr.Column(scale=6):
            models = gr.Dataframe(headers=MODEL_COLUMNS, value=model_rows(services), interactive=False,
                                  label="Models", wrap=True, elem_id="model-table")
            with gr.Row():
                choice = gr.Dropdown(downloadable(services), label="Download a model", value=None, scale=3,
                                     info="Weights come from the official release and are checked (SHA-256).")
                download = gr.Button("Download", scale=1)
            status = gr.Markdown("", padding=True)
            own = render_import(services)
    return SystemTab(info, models, choice, download, refresh, status, free, own)


def listen(tab: SystemTab, services, demo: gr.Blocks) -> list:
    """Wire the tab. Returns the events after which the set of models changed (download, import, remove): the app
    refreshes the model choices of the other tabs when they succeed."""
    def on_refresh():
        with friendly_errors("system info"):
            return (system_markdown(services), model_rows(services),
                    gr.update(choices=downloadable(services), value=None))

    outputs = [tab.info, tab.models, tab.choice]
    tab.refresh.click(on_refresh, outputs=outputs, api_visibility="private", concurrency_id="system")
    demo.load(on_refresh, outputs=outputs, api_visibility="private", concurrency_id="system")

    def on_free():
        with friendly_errors("free space"):
            return free_space(services), system_markdown(services)

    tab.free.click(on_free, outputs=[tab.status, tab.info], api_visibility="private", concurrency_id="system")

    def on_download(name, progress=gr.Progress()):
        if not name:
            raise gr.Error("Choose a model to download.", title="No model")

        def report(done: int, total: int | None) -> None:
            if total:
                progress(done / total, desc=f"{name}: {human_bytes(done)} of {human_bytes(total)}")
            else:
                progress(None, desc=f"{name}: {human_bytes(done)}")

        with friendly_errors("download model"):
            services.model_manager.download(name, report)
        return (f"Downloaded **{name}**.", model_rows(services), gr.update(choices=downloadable(services),
                                                                            value=None))

    downloaded = tab.download.click(on_download, inputs=[tab.choice], outputs=[tab.status, tab.models, tab.choice],
                                    api_visibility="private", concurrency_id="download", concurrency_limit=1)
    return [downloaded, *listen_import(tab.own, tab, services)]


# ------------------------------------------------------------------------------------------------ your own models
@dataclass
class ImportPanel:
    """Import a model from an uploaded file or a URL; remove an imported one."""

    file: gr.File
    url: gr.Textbox
    name: gr.Textbox
    kind: gr.Radio
    sha256: gr.Textbox
    run: gr.Button
    remove_choice: gr.Dropdown
    remove: gr.Button
    status: gr.Markdown


def imported(services) -> list[str]:
    catalog = services.model_manager.user_catalog
    return list(catalog.entries()) if catalog is not None else []


def render_import(services) -> ImportPanel:
    from engine.models.user_catalog import KINDS, SUFFIXES

    with gr.Accordion("Add your own model", open=False, elem_id="import-panel"):
        gr.Markdown("A super-resolution model from OpenModelDB or elsewhere (.pth, .pt, .ckpt or .safetensors of "
                    "an architecture spandrel knows: ESRGAN, Compact, SwinIR, SPAN, HAT, DAT…), or a face "
                    "restoration model (GFPGAN, RestoreFormer: offered as a face model). It is checked, "
                    "hashed and copied into the weights folder; files that would run code are refused.")
        with gr.Row():
            file = gr.File(label="Model file", file_types=list(SUFFIXES), type="filepath", elem_id="import-file")
            with gr.Column():
                url = gr.Textbox(label="…or its URL", placeholder="https://…/4x-Model.safetensors",
                                 elem_id="import-url")
                name = gr.Textbox(label="Name (optional)", placeholder="the file name", elem_id="import-name")
        with gr.Row():
            kind = gr.Radio(list(KINDS), value="general", label="What it is for", elem_id="import-kind")
            sha256 = gr.Textbox(label="SHA-256 (optional)", info="The file is refused unless it has this hash.")
        run = gr.Button("Import", variant="primary", elem_id="import-button")
        with gr.Row():
            remove_choice = gr.Dropdown(imported(services), label="Remove an imported model", value=None, scale=3)
            remove = gr.Button("Remove", scale=1, variant="stop")
        status = gr.Markdown("", padding=True, elem_id="import-status")
    return ImportPanel(file, url, name, kind, sha256, run, remove_choice, remove, status)


def listen_import(panel: ImportPanel, tab: SystemTab, services) -> list:
    def on_import(path, url, name, kind, sha256, progress=gr.Progress()):
        catalog = services.model_manager.user_catalog
        if catalog is None:
            raise gr.Error("This server's model catalog is fixed.", title="Import")
        if bool(path) == bool((url or "").strip()):
            raise gr.Error("Give either a model file or its URL.", title="Nothing to import")

        def report(done: int, total: int | None) -> None:
            progress(done / total if total else None, desc=f"Downloading: {human_bytes(done)}")

        from pathlib import Path

        from engine.downloader import DownloadPolicy

        config = services.config
        with friendly_errors("import model"):
            model = catalog.import_model(
                str(path) if path else url.strip(), name=(name or "").strip() or None, kind=kind,
                sha256=(sha256 or "").strip() or None, progress=report,
                policy=DownloadPolicy(timeout=config.download_timeout, retries=config.download_retries))
        if path:
            Path(path).unlink(missing_ok=True)  # the upload's temporary copy
        where = ("as a face model in the Image and Batch tabs" if model.kind == "face"
                 else "in the Image, Batch and Video tabs")
        message = (f"Imported **{model.name}**: {model.architecture} ×{model.scale}, {model.kind}. "
                   f"It is offered {where} now.")
        return message, model_rows(services), gr.update(choices=imported(services), value=None), None, ""

    imported_event = panel.run.click(on_import, inputs=[panel.file, panel.url, panel.name, panel.kind, panel.sha256],
                                     outputs=[panel.status, tab.models, panel.remove_choice, panel.file, panel.url],
                                     api_visibility="private", concurrency_id="download", concurrency_limit=1)

    def on_remove(name):
        if not name:
            raise gr.Error("Choose an imported model to remove.", title="No model")
        with friendly_errors("remove model"):
            services.model_manager.user_catalog.remove(name)
            services.model_manager.unload_model(name)
        return f"Removed **{name}**.", model_rows(services), gr.update(choices=imported(services), value=None)

    removed = panel.remove.click(on_remove, inputs=[panel.remove_choice],
                                 outputs=[panel.status, tab.models, panel.remove_choice], api_visibility="private",
                                 concurrency_id="download", concurrency_limit=1)
    return [imported_event, removed]
