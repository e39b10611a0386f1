"""The enhancement settings form, generated from the one settings model (:mod:`engine.settings`): one widget per
stored setting, with the model's choices, ranges, labels and help; and the conversions between widget values, the
stored settings dict and :class:`~engine.settings.EnhanceSettings`.

The same widgets serve the Image tab, the Batch tab and the Presets tab, so one ordered tuple of keys,
:data:`FORM_KEYS`, ties widget lists to dict keys everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import gradio as gr

from engine.catalog import active_catalog
from engine.settings import Advice, EnhanceSettings, FieldSpec, changed_fields, merge, sr_model_labels, stored_fields
from engine.settings_manager import validate_settings

#: The settings keys the form edits, in the order of :attr:`SettingsForm.components` (the stored settings).
FORM_KEYS: tuple[str, ...] = tuple(stored_fields())

#: Common values offered for the free-number settings (any other value in range may be typed).
SUGGESTED: Mapping[str, tuple[object, ...]] = {
    "outscale": (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0),
    "tile": (0, 128, 192, 256, 384, 512, 768, 1024),
    "tile_overlap": (0, 8, 16, 32, 64),
}
_ADVANCED = ("tile", "tile_overlap", "precision", "device", "output_format", "quality", "alpha_mode")


def sr_model_options() -> list[tuple[str, str]]:
    """(label, value) of every super-resolution model but "auto" (official and imported): the Video tab's model
    and the Image tab's comparison offer these."""
    from engine.settings import sr_model_labels

    return [(label, name) for name, label in sr_model_labels().items() if name != "auto"]


def choices_for(name: str, model_manager=None) -> list[tuple[str, str]]:
    """(label, value) choices of a setting offered as a dropdown, generated from its spec. Pure but for the
    model's readiness, shown when a model manager is given."""
    spec = stored_fields()[name]
    if name == "model":
        return _model_choices(model_manager)
    if name == "face_model":
        catalog = active_catalog()
        return [(f"{n} — {catalog[n].description}", n) for n in spec.choice_values()]
    if name == "device":
        return device_choices()
    if spec.kind == "choice":
        return [(spec.labels.get(value, value), value) for value in spec.choice_values()]
    options = [("Auto", "auto")] if spec.allow_auto else []
    options += [("Model's own scale", "")] if spec.nullable else []
    for value in SUGGESTED.get(name, ()):
        text = f"{value:g}" if isinstance(value, float) else str(value)
        label = {("tile", "0"): "No tiling (whole image)", ("tile_overlap", "0"): "None"}.get((name, text),
                                                                                              text + " px")
        options.append((f"×{text}" if name == "outscale" else label, text))
    return options


def _model_choices(model_manager=None) -> list[tuple[str, str]]:
    ready: dict[str, bool] = {}
    if model_manager is not None:
        ready = {s.name: s.available for s in model_manager.list_models("sr")}
    choices = []
    for name, label in sr_model_labels().items():
        state = "" if not ready or name == "auto" else (
            " · ready" if ready.get(name) else " · downloads on first use")
        choices.append((label + state, name))
    return choices


def device_choices() -> list[tuple[str, str]]:
    """Auto, CPU and every accelerator torch sees (with its name)."""
    choices = [("Auto (best available)", "auto"), ("CPU", "cpu")]
    try:
        from utils.gpu import list_devices

        for dev in list_devices():
            if dev.name != "cpu":
                choices.append((f"{dev.name} — {dev.label}", dev.name))
    except Exception:  # device listing is informational; auto and cpu always work
        pass
    return choices


@dataclass
class SettingsForm:
    """The rendered widgets, one per key of :data:`FORM_KEYS`."""

    widgets: dict[str, gr.components.Component]

    @property
    def components(self) -> list[gr.components.Component]:
        return [self.widgets[key] for key in FORM_KEYS]


def _widget(name: str, spec: FieldSpec, value: object, model_manager, face_enabled: bool):
    info = spec.help
    if spec.kind == "bool":
        interactive = face_enabled if name == "face_enhance" else None
        if name == "face_enhance" and not face_enabled:
            info = "Turned off on this server."
        return gr.Checkbox(value=value, label=spec.label, info=info, interactive=interactive)
    if spec.kind == "float" and not spec.nullable:
        return gr.Slider(spec.minimum, spec.maximum, value=value, step=spec.step, label=spec.label, info=info)
    if spec.kind == "int" and not spec.allow_auto and not spec.special:
        return gr.Slider(spec.minimum, spec.maximum, value=value, step=spec.step or 1, label=spec.label, info=info)
    free = spec.kind in ("int", "float", "text")  # any value the model accepts may be typed
    return gr.Dropdown(choices_for(name, model_manager), value=value, label=spec.label, info=info,
                       allow_custom_value=free)


def render_form(initial: Mapping[str, object], model_manager=None, *, face_enabled: bool = True) -> SettingsForm:
    """Render the settings widgets with ``initial`` values (a complete settings dict)."""
    values = dict(zip(FORM_KEYS, settings_to_widget_values(initial)))
    fields = stored_fields()
    widgets: dict[str, gr.components.Component] = {}
    for name in FORM_KEYS:
        if name not in _ADVANCED and name != "auto_settings":
            widgets[name] = _widget(name, fields[name], values[name], model_manager, face_enabled)
    with gr.Accordion("Advanced", open=False):
        for name in (*_ADVANCED, "auto_settings"):
            widgets[name] = _widget(name, fields[name], values[name], model_manager, face_enabled)
    return SettingsForm(widgets)


# ------------------------------------------------------------------------------------------------ conversions
def widget_values_to_settings(values: Sequence[object]) -> dict:
    """Widget values (in :data:`FORM_KEYS` order) → a validated, complete settings dict.

    Raises:
        InvalidSettingsError: a value out of range (the message names the setting).
    """
    if len(values) != len(FORM_KEYS):
        raise ValueError(f"expected {len(FORM_KEYS)} setting values, got {len(values)}")
    fields = stored_fields()
    raw = {key: fields[key].coerce(key, value) for key, value in zip(FORM_KEYS, values)}
    settings, _ = validate_settings(raw)
    return settings


def settings_to_widget_values(settings: Mapping[str, object]) -> list[object]:
    """A settings dict (possibly partial) → widget values in :data:`FORM_KEYS` order (a value this version
    refuses shows its default)."""
    merged, _ = validate_settings(dict(settings), lenient=True)
    out = []
    for key in FORM_KEYS:
        value = merged[key]
        spec = stored_fields()[key]
        if spec.kind in ("int", "float") and (spec.allow_auto or spec.nullable or spec.special):
            value = "" if value is None else value if value == "auto" else (
                f"{value:g}" if isinstance(value, float) else str(value))
        out.append(value)
    return out


def to_enhance_settings(settings: Mapping[str, object]) -> EnhanceSettings:
    """A stored settings dict → :class:`EnhanceSettings` (``auto_settings`` is the Batch tab's, not the engine's).

    Raises:
        InvalidSettingsError: a value the engine refuses.
    """
    return EnhanceSettings.from_mapping(settings)


def explicit_settings(settings: Mapping[str, object]) -> dict[str, object]:
    """The form's values the user changed from the defaults: these win over the advisor's."""
    return changed_fields(to_enhance_settings(settings))


def settings_from_recommendation(advice: Advice, current: Mapping[str, object]) -> dict:
    """The form's settings after "Apply recommendations": the advisor's choices, the user's other settings kept."""
    kept = {k: v for k, v in current.items() if k not in advice.decided}
    applied = merge(advice, kept).as_dict()
    settings, _ = validate_settings(dict(current) | {k: applied[k] for k in advice.decided})
    return settings
