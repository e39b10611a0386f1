"""The one settings model: :class:`EnhanceSettings`, its fields' ranges and help, and the advisor's :class:`Advice`.

Every other description of a setting is generated from :data:`FIELDS`: the stored preset schema
(:func:`stored_fields`), the Gradio form (``ui/form.py``), the command-line flags (:func:`add_cli_arguments`) and
the REST form fields (``ui/rest_api.py``). A value one of them accepts is a value the engine runs.

Advice is merged into settings in one place, :func:`merge`: values the user set explicitly always win.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Collection, Iterable, Literal, Mapping, get_args

from engine.catalog import DEFAULT_FACE_MODEL, active_catalog, face_models, model_label, sr_models
from engine.errors import InvalidSettingsError

Precision = Literal["auto", "fp32", "fp16", "bf16"]
OutputFormat = Literal["auto", "png", "jpg", "webp", "tiff"]
AlphaMode = Literal["model", "bicubic"]
FieldKind = Literal["float", "int", "bool", "choice", "text"]

PRECISIONS: tuple[str, ...] = get_args(Precision)
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)
ALPHA_MODES: tuple[str, ...] = get_args(AlphaMode)
MIN_SCALE, MAX_SCALE = 1.0, 8.0
MAX_SIDE = 65536


def sr_model_choices() -> tuple[str, ...]:
    """Every super-resolution model a setting may name, "auto" first (the advisor or the scale decides): the
    official ones, then the user's imported models (:func:`engine.catalog.use_user_catalog`)."""
    return ("auto",) + sr_models()


def sr_model_labels() -> dict[str, str]:
    """How each choice of :func:`sr_model_choices` is shown: name, scale and what it is for."""
    catalog = active_catalog()
    return {"auto": "Auto — picked for the image and the scale"} | {
        name: model_label(catalog[name]) for name in sr_model_choices()[1:]}


def face_model_choices() -> tuple[str, ...]:
    """Every face-restoration model a setting may name: the official ones, then the user's imported ones."""
    return face_models()


def _check_device(value: str) -> None:
    from config import _check_device as check  # one device-name rule for config and settings

    check(value)


@dataclass(frozen=True)
class FieldSpec:
    """What one setting accepts, its help text and where it appears.

    ``choices`` is a tuple or a function giving one (so a catalog change shows up everywhere). ``special`` lists
    integers allowed outside ``minimum..maximum`` (tile 0 = no tiling). ``cli``/``rest`` name the flag and the REST
    form field (None: not offered there); ``stored`` puts it in presets and the form; ``advised`` marks the
    settings the advisor decides.
    """

    kind: FieldKind
    help: str
    label: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    special: tuple[int, ...] = ()
    allow_auto: bool = False
    nullable: bool = False
    step: float | None = None
    check: Callable[[str], None] | None = None
    cli: str | None = None
    rest: str | None = None
    stored: bool = False
    advised: bool = False

    def choice_values(self) -> tuple[str, ...]:
        return self.choices() if callable(self.choices) else tuple(self.choices)

    def validate(self, name: str, value: object) -> object:
        """Return ``value`` in canonical form (ints to float for float fields).

        Raises:
            InvalidSettingsError: wrong type or out of range; the message names the setting and what it accepts.
        """
        if value is None and self.nullable:
            return None
        if self.allow_auto and value == "auto":
            return "auto"
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
        elif self.kind in ("choice", "text"):
            if isinstance(value, str) and value.strip() and len(value) <= 128:
                if self.kind == "choice" and value in self.choice_values():
                    return value
                if self.kind == "text":
                    try:
                        if self.check is not None:
                            self.check(value)
                        return value
                    except ValueError:
                        pass
        elif not isinstance(value, bool) and isinstance(value, (int, float)):
            number = float(value)
            if self.kind == "int" and not isinstance(value, int):  # coerce() reads widget floats
                raise self.error(name, value)
            if math.isfinite(number) and (self._in_range(number) or (self.kind == "int" and value in self.special)):
                return int(value) if self.kind == "int" else number
        raise self.error(name, value)

    def _in_range(self, number: float) -> bool:
        return ((self.minimum is None or number >= self.minimum) and (self.maximum is None or number <= self.maximum))

    def coerce(self, name: str, value: object) -> object:
        """Like :meth:`validate`, but first reads text and widget values ("256", 256.0, "true") as this kind."""
        if isinstance(value, str) and self.kind in ("int", "float", "bool"):
            text = value.strip().lower()
            if text in ("", "none", "null") and self.nullable:
                return None
            if text == "auto" and self.allow_auto:
                return "auto"
            if self.kind == "bool" and text in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                return text in ("true", "1", "yes", "on")
            try:
                value = float(text)
            except ValueError:
                raise self.error(name, value) from None
        if value == "" and self.nullable:
            return None
        if self.kind == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        return self.validate(name, value)

    def describe(self) -> str:
        """What the setting accepts, in words ("an integer from 16 to 8192, 0 or \"auto\"")."""
        if self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choice_values())
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "text":
            text = "a name" if self.check is None else "a device name (auto, cpu, cuda, cuda:N or mps)"
        else:
            noun = "an integer" if self.kind == "int" else "a number"
            text = (f"{noun} from {self.minimum:g} to {self.maximum:g}" if self.maximum is not None
                    else f"{noun} of at least {self.minimum:g}")
        extras = [str(v) for v in self.special] + (['"auto"'] if self.allow_auto and self.kind != "choice" else [])
        extras += ["empty (none)"] if self.nullable else []
        return text + (", or " + " or ".join(extras) if extras else "")

    def error(self, name: str, value: object) -> InvalidSettingsError:
        return InvalidSettingsError(f"Setting {name!r} must be {self.describe()}, got {value!r}.")


def _spec(**kwargs) -> dict:
    return {"spec": FieldSpec(**kwargs)}


# ------------------------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class EnhanceSettings:
    """Everything that decides how an image is enhanced; validated on construction against :data:`FIELDS`.

    ``outscale`` None means the model's native scale. At most one of ``target_width``, ``target_height`` and
    ``max_side`` may be set; it overrides ``outscale``. ``tile`` 0 runs the whole image at once, ``"auto"`` picks
    the largest tile that fits the device's free memory (:func:`engine.inference.planning.choose_tile`).
    """

    model: str = field(default="auto", metadata=_spec(
        kind="choice", choices=sr_model_choices, label="Model", cli="--model", rest="model", stored=True,
        advised=True, help="Super-resolution model; auto picks one for the content and the scale."))
    outscale: float | None = field(default=None, metadata=_spec(
        kind="float", minimum=MIN_SCALE, maximum=MAX_SCALE, nullable=True, step=0.5, label="Upscale factor",
        cli="--scale", rest="upscale_factor", stored=True, advised=True,
        help="How many times larger the result is (empty: the model's own scale)."))
    target_width: int | None = field(default=None, metadata=_spec(
        kind="int", minimum=1, maximum=MAX_SIDE, nullable=True, label="Target width", cli="--width",
        help="Target width in pixels (the height keeps the aspect); overrides the scale."))
    target_height: int | None = field(default=None, metadata=_spec(
        kind="int", minimum=1, maximum=MAX_SIDE, nullable=True, label="Target height", cli="--height",
        help="Target height in pixels (the width keeps the aspect); overrides the scale."))
    max_side: int | None = field(default=None, metadata=_spec(
        kind="int", minimum=1, maximum=MAX_SIDE, nullable=True, label="Longest side", cli="--max-side",
        help="Longest output side in pixels; overrides the scale."))
    tile: int | Literal["auto"] = field(default="auto", metadata=_spec(
        kind="int", minimum=16, maximum=8192, special=(0,), allow_auto=True, label="Tile size", cli="--tile",
        rest="tile", stored=True, advised=True,
        help="Tile size in input pixels: smaller tiles use less memory; 0 = whole image; auto fits the memory."))
    tile_overlap: int | Literal["auto"] = field(default="auto", metadata=_spec(
        kind="int", minimum=0, maximum=256, allow_auto=True, label="Tile overlap", cli="--tile-overlap",
        stored=True, help="Context shared by neighbouring tiles in input pixels; auto suits the model and tile."))
    denoise_strength: float = field(default=0.5, metadata=_spec(
        kind="float", minimum=0.0, maximum=1.0, step=0.05, label="Denoise strength", cli="--denoise-strength",
        rest="denoise_strength", stored=True, advised=True,
        help="Used by realesr-general-x4v3: 0 keeps grain and texture, 1 removes the most noise."))
    face_enhance: bool = field(default=False, metadata=_spec(
        kind="bool", label="Restore faces", cli="--face-enhance", rest="face_enhance", stored=True, advised=True,
        help="Restore faces with the face model after upscaling (photos of people)."))
    face_strength: float = field(default=0.8, metadata=_spec(
        kind="float", minimum=0.0, maximum=1.0, step=0.05, label="Face strength", cli="--face-strength",
        rest="face_strength", stored=True,
        help="Blend of the restored faces: 0 keeps the original face, 1 uses the restored face fully."))
    face_model: str = field(default=DEFAULT_FACE_MODEL, metadata=_spec(
        kind="choice", choices=face_model_choices, label="Face model", cli="--face-model", rest="face_model",
        stored=True, help="Face restoration model."))
    only_center_face: bool = field(default=False, metadata=_spec(
        kind="bool", label="Only the centre face", cli="--only-center-face", help="Restore only the face nearest "
        "the centre."))
    save_face_crops: bool = field(default=False, metadata=_spec(
        kind="bool", label="Save face crops", cli="--save-face-crops",
        help="Save each restored face next to the output."))
    force_face_enhance: bool = field(default=False, metadata=_spec(
        kind="bool", label="Restore faces on drawings", cli="--force-faces",
        help="Restore faces even where the image looks like a drawing."))
    precision: Precision = field(default="auto", metadata=_spec(
        kind="choice", choices=PRECISIONS, label="Precision", cli="--precision", rest="precision", stored=True,
        advised=True, labels=MappingProxyType({
            "auto": "Auto (fp16 on capable GPUs, fp32 on CPU)", "fp32": "fp32 (exact, slower on GPU)",
            "fp16": "fp16 (GPU, fastest)", "bf16": "bf16 (recent GPUs; CPUs with AVX512-BF16 or AMX)"}),
        help="Inference precision; auto = fp16 on GPUs that support it, fp32 on the CPU."))
    device: str = field(default="auto", metadata=_spec(
        kind="text", check=_check_device, label="Device", cli="--device", stored=True,
        help="auto, cpu, cuda, cuda:N or mps."))
    output_format: OutputFormat = field(default="auto", metadata=_spec(
        kind="choice", choices=OUTPUT_FORMATS, label="Output format", cli="--format", rest="output_format",
        stored=True, labels=MappingProxyType({
            "auto": "Same as the input", "png": "PNG (lossless)", "jpg": "JPEG", "webp": "WebP",
            "tiff": "TIFF (keeps 16 bits)"}),
        help="Output file format; auto keeps the input's format."))
    quality: int = field(default=95, metadata=_spec(
        kind="int", minimum=1, maximum=100, step=1, label="JPEG/WebP quality", cli="--quality", rest="quality",
        stored=True, help="JPEG/WebP quality, 1 to 100."))
    alpha_mode: AlphaMode = field(default="model", metadata=_spec(
        kind="choice", choices=ALPHA_MODES, label="Transparency", cli="--alpha", rest="alpha_mode", stored=True,
        labels=MappingProxyType({"model": "Upscale transparency with the model",
                                 "bicubic": "Resize transparency (faster)"}),
        help="How an alpha channel is upscaled: by the model or resized."))
    keep_metadata: bool = field(default=True, metadata=_spec(
        kind="bool", label="Keep metadata", cli="--metadata", help="Copy EXIF and the ICC profile to the output."))
    second_pass: bool = field(default=False, metadata=_spec(
        kind="bool", label="Second pass", help="Beyond the model's scale, run the model twice instead of resizing."))
    batch_size: int = field(default=4, metadata=_spec(
        kind="int", minimum=1, maximum=64, label="Tiles per forward call",
        help="Same-shape tiles per forward call on a GPU (the CPU runs one at a time)."))
    quality_metrics: bool = field(default=True, metadata=_spec(
        kind="bool", label="Quality metrics", cli="--metrics", help="Measure the result's quality (PSNR, NIQE, ...)."))

    def __post_init__(self) -> None:
        for name, spec in FIELDS.items():
            object.__setattr__(self, name, spec.validate(name, getattr(self, name)))
        if sum(v is not None for v in (self.target_width, self.target_height, self.max_side)) > 1:
            raise InvalidSettingsError("Give only one of target width, target height and max side.")

    @classmethod
    def from_mapping(cls, values: Mapping[str, object], *, coerce: bool = False) -> "EnhanceSettings":
        """Build from a dict (presets, widgets, JSON); keys that are no setting are ignored.

        With ``coerce`` text and widget values are read as the field's kind first ("256" → 256).

        Raises:
            InvalidSettingsError: a value out of range (the message names the setting).
        """
        data = {k: v for k, v in values.items() if k in FIELDS}
        if coerce:
            data = {k: FIELDS[k].coerce(k, v) for k, v in data.items()}
        return cls(**data)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "EnhanceSettings":
        return dataclasses.replace(self, **changes)

    def requested_scale(self, width: int, height: int) -> float | None:
        """The scale the settings ask for on a ``width``×``height`` input (None: the model's own). Pure."""
        if self.target_width is not None:
            return self.target_width / width
        if self.target_height is not None:
            return self.target_height / height
        if self.max_side is not None:
            return self.max_side / max(width, height)
        return self.outscale


#: Every setting's spec, in declaration order.
FIELDS: Mapping[str, FieldSpec] = MappingProxyType(
    {f.name: f.metadata["spec"] for f in dataclasses.fields(EnhanceSettings)})
#: Every setting's default.
DEFAULTS: Mapping[str, object] = MappingProxyType(
    {f.name: f.default for f in dataclasses.fields(EnhanceSettings)})
#: The settings the advisor decides (the rest are the user's alone).
ADVISED: frozenset[str] = frozenset(name for name, spec in FIELDS.items() if spec.advised)

#: Stored with presets and shown on the form, but no engine setting: the Batch tab's "let the advisor choose".
AUTO_SETTINGS = FieldSpec(kind="bool", label="Batch: let the advisor choose for each image", stored=True,
                          help="Used by the Batch tab: the advisor picks model, scale and faces per image; the "
                               "values you changed on the form still win.")


def stored_fields() -> Mapping[str, FieldSpec]:
    """The settings kept in presets and ``settings.json``, in form order (plus ``auto_settings``)."""
    fields = {name: spec for name, spec in FIELDS.items() if spec.stored}
    return MappingProxyType(fields | {"auto_settings": AUTO_SETTINGS})


AUTO_SETTINGS_DEFAULT = True


def stored_defaults() -> dict[str, object]:
    return {name: DEFAULTS.get(name, AUTO_SETTINGS_DEFAULT) for name in stored_fields()}


# ------------------------------------------------------------------------------------------------ advice
@dataclass(frozen=True)
class Advice:
    """The advisor's recommendation for one image on this machine.

    ``settings`` is complete; ``decided`` names the settings the advisor chose (the others are defaults).
    ``analysis`` is the JSON-safe measurement record shown to the user. ``faces`` is the face detection of the
    pixels it analysed (an ``engine.face_detect.FaceDetection``), which a job on those very pixels restores
    instead of detecting them again; it is not part of the JSON form (None once read back from it).
    """

    settings: EnhanceSettings
    reasons: tuple[str, ...]
    analysis: Mapping[str, Any] = field(default_factory=dict)
    estimated_seconds: float = 0.0
    estimated_memory_mb: float = 0.0
    alternatives: tuple[Mapping[str, Any], ...] = ()
    decided: frozenset[str] = ADVISED
    faces: Any = field(default=None, compare=False, repr=False)

    def as_dict(self) -> dict:
        """JSON form (CLI ``--json``, the UI): settings by their field names, reasons, analysis, estimates."""
        return {"settings": self.settings.as_dict(), "decided": sorted(self.decided), "reasoning": list(self.reasons),
                "analysis": dict(self.analysis), "estimated_seconds": self.estimated_seconds,
                "estimated_memory_mb": self.estimated_memory_mb, "alternatives": [dict(a) for a in self.alternatives]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Advice":
        """The inverse of :meth:`as_dict` (an advice kept in a UI state or sent as JSON).

        Raises:
            InvalidSettingsError: the settings are not valid.
        """
        return cls(settings=EnhanceSettings.from_mapping(data.get("settings") or {}),
                   reasons=tuple(data.get("reasoning") or ()), analysis=dict(data.get("analysis") or {}),
                   estimated_seconds=float(data.get("estimated_seconds") or 0.0),
                   estimated_memory_mb=float(data.get("estimated_memory_mb") or 0.0),
                   alternatives=tuple(data.get("alternatives") or ()),
                   decided=frozenset(data.get("decided", ADVISED)) & ADVISED)


def merge(advice: Advice | None, explicit: Mapping[str, object], base: EnhanceSettings | None = None
          ) -> EnhanceSettings:
    """The settings to run: ``base`` (defaults), then what the advisor decided, then every value the user set
    explicitly — those always win (``--auto --scale 2`` runs at ×2).

    Args:
        advice: the advisor's recommendation, or None (no advisor: the explicit values over ``base``).
        explicit: only the settings the user set (CLI flags given, REST fields sent, form values changed).
        base: the settings underneath; defaults when None.

    Raises:
        InvalidSettingsError: an explicit value out of range, or a combination that cannot run.
    """
    values = (base or EnhanceSettings()).as_dict()
    if advice is not None:
        chosen = advice.settings.as_dict()
        values.update({name: chosen[name] for name in advice.decided})
    values.update({k: v for k, v in explicit.items() if k in FIELDS})
    if any(k in explicit for k in ("target_width", "target_height", "max_side")):
        values["outscale"] = explicit.get("outscale")  # a size target replaces the advised scale
    return EnhanceSettings.from_mapping(values)


def changed_fields(settings: EnhanceSettings, names: Iterable[str] | None = None) -> dict[str, object]:
    """The settings whose value differs from the default (what a form's user changed)."""
    values = settings.as_dict()
    return {k: values[k] for k in (names or FIELDS) if k in FIELDS and values[k] != DEFAULTS[k]}


# ------------------------------------------------------------------------------------------------ the CLI
def add_cli_arguments(parser: argparse.ArgumentParser, names: Collection[str] | None = None,
                      defaults: Mapping[str, object] | None = None) -> None:
    """Add a flag for each setting with a ``cli`` name (all, or ``names``), with type, choices and help from
    :data:`FIELDS`. Every flag defaults to None so :func:`explicit_from_cli` sees what the user typed; ``defaults``
    gives a subcommand its own starting values (``video`` starts from realesr-animevideov3 ×2)."""
    sizes = None  # made only when a size flag joins it: argparse cannot print the help of an empty group
    for name, spec in FIELDS.items():
        if spec.cli is None or (names is not None and name not in names):
            continue
        target = parser
        if name in ("target_width", "target_height", "max_side"):
            sizes = target = sizes or parser.add_mutually_exclusive_group()
        help_text = f"{spec.help} Accepts {spec.describe()}."
        if defaults and name in defaults:
            help_text += f" Default: {defaults[name]}."
        if spec.kind == "bool":
            target.add_argument(spec.cli, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif spec.kind == "choice":
            target.add_argument(spec.cli, dest=name, default=None, choices=spec.choice_values(), help=help_text)
        else:
            target.add_argument(spec.cli, dest=name, default=None, type=_cli_type(name, spec), help=help_text,
                                metavar=name.upper())


def _cli_type(name: str, spec: FieldSpec) -> Callable[[str], object]:
    def parse(text: str) -> object:
        try:
            return spec.coerce(name, text)
        except InvalidSettingsError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name  # argparse names the type in its message
    return parse


def explicit_from_cli(args: argparse.Namespace, defaults: Mapping[str, object] | None = None) -> dict[str, object]:
    """The settings the user gave on the command line (flags left out are not in the dict), over ``defaults``."""
    given = {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
    return dict(defaults or {}) | given
