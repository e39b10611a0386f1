"""The enhancement settings form: widgets built from the catalog and the settings schema, and the conversions
between widget values, the stored settings dict (:data:`engine.settings_manager.SETTINGS_SCHEMA`) and
:class:`engine.processor.EnhanceSettings`.

The same widgets serve the Image tab, the Batch tab (fixed settings) and the Presets tab (save/load), so one
ordered tuple of keys, :data:`FORM_KEYS`, ties widget lists to dict keys everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import gradio as gr

from engine.catalog import CATALOG, FACE_MODELS, SR_MODELS
from engine.processor import EnhanceSettings
from engine.settings_manager import DEFAULT_SETTINGS, validate_settings

#: The settings keys the form edits, in the order of :attr:`SettingsForm.components`.
FORM_KEYS: tuple[str, ...] = ("model", "outscale", "denoise_strength", "face_enhance", "face_strength",
                              "face_model", "tile", "precision", "device", "output_format", "quality", "alpha_mode",
                              "auto_settings")

TILE_CHOICES: tuple[tuple[str, str], ...] = (
    ("Auto (fits the free memory)", "auto"), ("No tiling (whole image at once)", "0"), ("128 px", "128"),
    ("192 px", "192"), ("256 px", "256"), ("384 px", "384"), ("512 px", "512"), ("768 px", "768"),
    ("1024 px", "1024"))
PRECISION_CHOICES = (("Auto (fp16 on capable GPUs, fp32 on CPU)", "auto"), ("fp32 (exact, slower on GPU)", "fp32"),
                     ("fp16 (GPU, fastest)", "fp16"), ("bf16 (recent GPUs)", "bf16"))
FORMAT_CHOICES = (("Same as the input", "auto"), ("PNG (lossless)", "png"), ("JPEG", "jpg"), ("WebP", "webp"),
                  ("TIFF (keeps 16 bits)", "tiff"))
ALPHA_CHOICES = (("Upscale transparency with the model", "model"), ("Resize transparency (faster)", "bicubic"))


def model_choices(model_manager=None) -> list[tuple[str, str]]:
    """Dropdown choices for the super-resolution models, with a short description and whether it is ready."""
    ready: dict[str, bool] = {}
    if model_manager is not None:
        ready = {s.name: s.available for s in model_manager.list_models("sr")}
    choices = [("Auto — picked for the image and the scale", "auto")]
    for name in SR_MODELS:
        spec = CATALOG[name]
        state = "" if not ready else (" · ready" if ready.get(name) else " · downloads on first use")
        choices.append((f"{name} (×{spec.scale}) — {spec.description}{state}", name))
    return choices


def face_model_choices() -> list[tuple[str, str]]:
    return [(f"{name} — {CATALOG[name].description}", name) for name in FACE_MODELS]


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

    model: gr.Dropdown
    outscale: gr.Slider
    denoise_strength: gr.Slider
    face_enhance: gr.Checkbox
    face_strength: gr.Slider
    face_model: gr.Dropdown
    tile: gr.Dropdown
    precision: gr.Dropdown
    device: gr.Dropdown
    output_format: gr.Dropdown
    quality: gr.Slider
    alpha_mode: gr.Radio
    auto_settings: gr.Checkbox

    @property
    def components(self) -> list[gr.components.Component]:
        return [getattr(self, key) for key in FORM_KEYS]


def render_form(initial: Mapping[str, object], model_manager=None, *, face_enabled: bool = True) -> SettingsForm:
    """Render the settings widgets with ``initial`` values (a complete settings dict)."""
    values = settings_to_widget_values(initial)
    v = dict(zip(FORM_KEYS, values))
    model = gr.Dropdown(model_choices(model_manager), value=v["model"], label="Model",
                        info="Auto picks a model for the content; anime models suit drawings, the others photos.")
    outscale = gr.Slider(1, 8, value=v["outscale"], step=0.5, label="Upscale factor",
                         info="How many times larger the result is (×4 turns 500 px into 2000 px).")
    denoise = gr.Slider(0, 1, value=v["denoise_strength"], step=0.05, label="Denoise strength",
                        info="Used by realesr-general-x4v3: 0 keeps grain and texture, 1 removes the most noise.")
    with gr.Row():
        face_enhance = gr.Checkbox(value=v["face_enhance"], label="Restore faces", interactive=face_enabled,
                                   info="Sharpen faces with GFPGAN (photos of people)." if face_enabled
                                   else "Turned off on this server.")
        face_strength = gr.Slider(0, 1, value=v["face_strength"], step=0.05, label="Face strength",
                                  info="0 keeps the original face, 1 uses the restored face fully.")
    face_model = gr.Dropdown(face_model_choices(), value=v["face_model"], label="Face model")
    with gr.Accordion("Advanced", open=False):
        tile = gr.Dropdown(list(TILE_CHOICES), value=v["tile"], label="Tile size",
                           info="Large images are processed in tiles; smaller tiles use less memory.")
        with gr.Row():
            precision = gr.Dropdown(list(PRECISION_CHOICES), value=v["precision"], label="Precision")
            device = gr.Dropdown(device_choices(), value=v["device"], label="Device", allow_custom_value=True)
        with gr.Row():
            output_format = gr.Dropdown(list(FORMAT_CHOICES), value=v["output_format"], label="Output format")
            quality = gr.Slider(1, 100, value=v["quality"], step=1, label="JPEG/WebP quality")
        alpha_mode = gr.Radio(list(ALPHA_CHOICES), value=v["alpha_mode"], label="Transparency")
        auto_settings = gr.Checkbox(value=v["auto_settings"], label="Batch: let the advisor choose for each image",
                                    info="Used by the Batch tab.")
    return SettingsForm(model, outscale, denoise, face_enhance, face_strength, face_model, tile, precision, device,
                        output_format, quality, alpha_mode, auto_settings)


# ------------------------------------------------------------------------------------------------ conversions
def widget_values_to_settings(values: Sequence[object]) -> dict:
    """Widget values (in :data:`FORM_KEYS` order) → a validated, complete settings dict.

    Raises:
        InvalidSettingsError: a value out of range (the message names the setting).
    """
    if len(values) != len(FORM_KEYS):
        raise ValueError(f"expected {len(FORM_KEYS)} setting values, got {len(values)}")
    raw = dict(zip(FORM_KEYS, values))
    tile = raw.get("tile")
    raw["tile"] = "auto" if tile in (None, "", "auto") else int(float(str(tile)))
    raw["quality"] = int(round(float(raw["quality"]))) if raw.get("quality") is not None else 95
    for key in ("outscale", "denoise_strength", "face_strength"):
        if raw.get(key) is not None:
            raw[key] = float(raw[key])
    for key in ("face_enhance", "auto_settings"):
        raw[key] = bool(raw.get(key))
    raw = {k: v for k, v in raw.items() if v is not None}
    settings, _ = validate_settings(raw)
    return settings


def settings_to_widget_values(settings: Mapping[str, object]) -> list[object]:
    """A settings dict (possibly partial) → widget values in :data:`FORM_KEYS` order."""
    merged = dict(DEFAULT_SETTINGS) | dict(settings)
    out = []
    for key in FORM_KEYS:
        value = merged[key]
        if key == "tile":
            value = "auto" if value == "auto" else str(int(value))
            if value not in {c[1] for c in TILE_CHOICES}:
                value = "auto" if value != "0" else "0"
        elif key == "model" and value != "auto" and value not in SR_MODELS:
            value = "auto"
        elif key == "face_model" and value not in FACE_MODELS:
            value = DEFAULT_SETTINGS["face_model"]
        out.append(value)
    return out


def to_enhance_settings(settings: Mapping[str, object]) -> EnhanceSettings:
    """A stored settings dict → :class:`EnhanceSettings` (keys the engine does not know are ignored).

    Raises:
        InvalidSettingsError: a value the engine refuses.
    """
    values = dict(settings)
    values.pop("auto_settings", None)
    return EnhanceSettings.from_mapping(values)


def settings_from_recommendation(advised: Mapping[str, object], current: Mapping[str, object]) -> dict:
    """The form's settings after applying the advisor's recommended ``advised`` settings over ``current``."""
    updated = dict(current)
    if advised.get("model"):
        updated["model"] = advised["model"]
    if advised.get("scale") is not None:
        updated["outscale"] = float(advised["scale"])
    for key in ("face_enhance", "face_strength", "denoise_strength"):
        if advised.get(key) is not None:
            updated[key] = advised[key]
    if advised.get("precision"):
        updated["precision"] = advised["precision"]
    elif advised.get("fp32"):
        updated["precision"] = "fp32"
    if "auto_tile" in advised or "tile" in advised:
        updated["tile"] = "auto" if advised.get("auto_tile", True) else int(advised.get("tile") or 0)
    settings, _ = validate_settings({k: v for k, v in updated.items()})
    return settings
