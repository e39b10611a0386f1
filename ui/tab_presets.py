"""Tab 4, Presets: save the Image tab's settings under a name, load them back, delete, export and import JSON.
Built-in presets can be loaded but neither deleted nor overwritten.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import gradio as gr

from ui import form as form_mod
from ui.errors import friendly_errors
from ui.uploads import new_output_dir, upload_path

logger = logging.getLogger(__name__)


def preset_choices(manager) -> list[tuple[str, str]]:
    return [(f"{name} (built-in)" if info["builtin"] else name, name) for name, info in manager.load_presets().items()]


def presets_overview(manager) -> str:
    """A short Markdown table of every preset: name, kind, model, scale, faces."""
    rows = ["| Preset | Kind | Model | Scale | Faces |", "| --- | --- | --- | --- | --- |"]
    for name, info in manager.load_presets().items():
        s = info["settings"]
        rows.append(f"| {name} | {'built-in' if info['builtin'] else 'yours'} | {s.get('model')} | "
                    f"×{s.get('outscale')} | {'on' if s.get('face_enhance') else 'off'} |")
    return "\n".join(rows)


# Plain handlers (the tests call these directly).
def save_preset(manager, name: str, values: Sequence[object]) -> str:
    settings = form_mod.widget_values_to_settings(values)
    return manager.save_preset(name, settings)


def load_preset(manager, name: str) -> list[object]:
    return form_mod.settings_to_widget_values(manager.get_preset(name))


def delete_preset(manager, name: str) -> None:
    manager.delete_preset(name)


def export_presets(manager, config) -> Path:
    folder = new_output_dir(config, "presets")
    path = folder / "realesrgan_presets.json"
    manager.export_presets(path)
    return path


def import_presets(manager, path: str | Path, max_bytes: int = 2 * 1024 * 1024) -> list[str]:
    from engine.errors import InvalidInputError

    path = Path(path)
    if path.stat().st_size > max_bytes:
        raise InvalidInputError(f"The presets file is larger than {max_bytes // 1024} KB; is it the right file?")
    return manager.import_presets(path.read_bytes())


@dataclass
class PresetsTab:
    choice: gr.Dropdown
    load: gr.Button
    delete: gr.Button
    name: gr.Textbox
    save: gr.Button
    export: gr.Button
    export_file: gr.File
    import_file: gr.File
    status: gr.Markdown
    overview: gr.Markdown


def render(services) -> PresetsTab:
    gr.Markdown("A preset is a named set of the Image tab's settings. Built-in presets can be used but not "
                "deleted. Your own presets are kept on this computer and can be exported to a JSON file.")
    with gr.Row(equal_height=False):
        with gr.Column():
            choice = gr.Dropdown(preset_choices(services.settings), label="Presets", value=None,
                                 elem_id="preset-choice")
            with gr.Row():
                load = gr.Button("Load into the Image tab", variant="primary")
                delete = gr.Button("Delete", variant="stop")
            name = gr.Textbox(label="New preset name", placeholder="e.g. My scans", max_lines=1, max_length=64,
                              elem_id="preset-name")
            save = gr.Button("Save the current settings as a preset", elem_id="preset-save")
            overview = gr.Markdown(presets_overview(services.settings), elem_id="preset-overview")
        with gr.Column():
            export = gr.Button("Export my presets")
            export_file = gr.File(label="Exported presets", interactive=False)
            import_file = gr.File(label="Import presets (JSON)", file_types=[".json"], file_count="single")
            status = gr.Markdown("", padding=True, elem_id="preset-status")
    return PresetsTab(choice, load, delete, name, save, export, export_file, import_file, status, overview)


def listen(tab: PresetsTab, services, form: form_mod.SettingsForm) -> None:
    manager = services.settings
    private = dict(api_visibility="private", queue=False)

    def refreshed(selected=None):
        return gr.update(choices=preset_choices(manager), value=selected)

    def on_save(name, *values):
        with friendly_errors("save preset"):
            saved = save_preset(manager, name, values)
        return refreshed(saved), f"Saved preset **{saved}**.", "", presets_overview(manager)

    tab.save.click(on_save, inputs=[tab.name, *form.components],
                   outputs=[tab.choice, tab.status, tab.name, tab.overview], **private)

    def on_load(name):
        if not name:
            raise gr.Error("Choose a preset first.", title="No preset")
        with friendly_errors("load preset"):
            values = load_preset(manager, name)
        return [*values, f"Loaded **{name}** into the Image tab's settings."]

    tab.load.click(on_load, inputs=[tab.choice], outputs=[*form.components, tab.status], **private)

    def on_delete(name):
        if not name:
            raise gr.Error("Choose a preset first.", title="No preset")
        with friendly_errors("delete preset"):
            delete_preset(manager, name)
        return refreshed(None), f"Deleted **{name}**.", presets_overview(manager)

    tab.delete.click(on_delete, inputs=[tab.choice], outputs=[tab.choice, tab.status, tab.overview], **private)

    def on_export():
        with friendly_errors("export presets"):
            path = export_presets(manager, services.config)
        return str(path), "Exported your presets (built-ins are not included)."

    tab.export.click(on_export, outputs=[tab.export_file, tab.status], **private)

    def on_import(payload):
        path = upload_path(payload)
        if path is None:
            return refreshed(), "", presets_overview(manager)
        with friendly_errors("import presets"):
            names = import_presets(manager, path)
        for warning in manager.pop_warnings():
            gr.Warning(warning)
        return (refreshed(), f"Imported {len(names)} preset(s): " + ", ".join(f"**{n}**" for n in names),
                presets_overview(manager))

    tab.import_file.upload(on_import, inputs=[tab.import_file], outputs=[tab.choice, tab.status, tab.overview],
                           preprocess=False, api_visibility="private")
