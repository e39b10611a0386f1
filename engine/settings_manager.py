"""Persistence of the last-used settings and of named presets, crash-safe and shared between processes.

Two JSON files live in ``config_dir``:

* ``settings.json`` -- ``{"version": 1, "settings": {<key>: <value>, ...}}``: the settings last used.
* ``presets.json`` -- ``{"version": 1, "presets": {<name>: {<key>: <value>, ...}, ...}}``: the user's presets
  (built-in presets live in code, :data:`BUILTIN_PRESETS`, and are never written).

Every value is checked against :data:`SETTINGS_SCHEMA`, which is generated from the one settings model
(:mod:`engine.settings`), so a value that saves is a value that runs. Unknown keys are dropped with a warning. When
saving or importing, a wrong type or an out-of-range value raises :class:`~engine.errors.InvalidSettingsError` (a
``ValueError``) naming the key; when reading a file written by an older version, such a value falls back to its
default with a warning naming the key, and missing keys take their default from :data:`DEFAULT_SETTINGS`.

Durability: a file is replaced atomically (temp file in the same folder, write, flush, ``os.fsync``,
``os.replace``, ``fsync`` of the folder), after the previous version has been copied to ``<file>.bak`` the same
way. A reader therefore sees the old or the new version, never a mix, even if the writer is killed. A file that
does not parse or does not match the schema is set aside as ``<file>.corrupt-<timestamp>`` (never deleted) and the
manager continues from ``<file>.bak`` when that is valid, otherwise from defaults; what happened is added to
:attr:`SettingsManager.warnings` for the UI to show. A deleted (missing) file simply means defaults.

Concurrency: every operation takes a :class:`filelock.FileLock` on ``config_dir/.settings.lock`` and re-reads the
file under it, so writers in other threads and other processes are serialised and no update is lost. Temp files
left by a killed writer are removed when a manager is constructed (under the lock, so a live writer's temp file
is never touched).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import unicodedata
from pathlib import Path
from types import MappingProxyType
from typing import Literal, Mapping, TypedDict

from engine.errors import BuiltinPresetError, InvalidSettingsError, PresetNotFoundError, SettingsStorageError
from engine.settings import (AlphaMode, EnhanceSettings, FieldSpec, OutputFormat, Precision, stored_defaults,
                             stored_fields)
from utils.atomic import fsync_dir, write_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_PRESETS",
    "DEFAULT_SETTINGS",
    "MAX_PRESET_NAME_LENGTH",
    "SETTINGS_SCHEMA",
    "BuiltinPresetError",
    "PresetNotFoundError",
    "Settings",
    "SettingsManager",
    "SettingsStorageError",
    "sanitize_preset_name",
    "validate_settings",
]

FORMAT_VERSION = 1
SETTINGS_FILE = "settings.json"
PRESETS_FILE = "presets.json"
LOCK_FILE = ".settings.lock"
MAX_PRESET_NAME_LENGTH = 64
MAX_PRESETS = 1000
MAX_IMPORT_BYTES = 2 * 1024 * 1024
LOCK_TIMEOUT_S = 15.0


# ---------------------------------------------------------------------------------------------------- schema
#: Every key the app stores, in display order, generated from the one settings model (:mod:`engine.settings`):
#: a value that saves is a value that runs.
SETTINGS_SCHEMA: Mapping[str, FieldSpec] = stored_fields()

#: The settings used when nothing was saved; every preset is applied over these.
DEFAULT_SETTINGS: Mapping[str, object] = MappingProxyType(stored_defaults())


class Settings(TypedDict):
    """The settings dict at the JSON boundary (see :data:`SETTINGS_SCHEMA` for ranges)."""

    model: str
    outscale: float | None
    tile: int | Literal["auto"]
    tile_overlap: int | Literal["auto"]
    denoise_strength: float
    face_enhance: bool
    face_strength: float
    face_model: str
    precision: Precision
    device: str
    output_format: OutputFormat
    quality: int
    alpha_mode: AlphaMode
    auto_settings: bool


def validate_settings(values: object, base: Mapping[str, object] = DEFAULT_SETTINGS, *,
                      lenient: bool = False) -> tuple[dict, list[str]]:
    """Check ``values`` against :data:`SETTINGS_SCHEMA` and complete it from ``base``.

    Args:
        values: a mapping of setting keys to JSON values; it may hold only some keys.
        base: values for the keys ``values`` lacks (the defaults unless told otherwise).
        lenient: a refused value falls back to ``base`` with a warning naming the setting, instead of raising
            (for files written by older versions: one bad value must not lose the whole preset).

    Returns:
        ``(settings, warnings)``: a complete new dict in schema order, and one message per key dropped.

    Raises:
        InvalidSettingsError: ``values`` is not a mapping, or (unless ``lenient``) a value has the wrong type or
            range (names the key), or the combination cannot run.
    """
    if not isinstance(values, Mapping):
        raise InvalidSettingsError(f"Settings must be a JSON object of key/value pairs, got {type(values).__name__}.")
    warnings = [
        f"Unknown setting {key!r} was ignored (known settings: {', '.join(SETTINGS_SCHEMA)})."
        for key in values if key not in SETTINGS_SCHEMA
    ]
    settings = {}
    for name, spec in SETTINGS_SCHEMA.items():
        try:
            settings[name] = spec.validate(name, values[name]) if name in values else base[name]
        except InvalidSettingsError as exc:
            if not lenient:
                raise
            settings[name] = base[name]
            warnings.append(f"{exc} The default ({base[name]!r}) is used instead.")
    EnhanceSettings.from_mapping(settings)  # the combination runs
    return settings, warnings


def sanitize_preset_name(name: object) -> str:
    """Return ``name`` NFC-normalised with surrounding whitespace removed.

    Raises:
        InvalidSettingsError: not a string, empty, longer than 64 characters, or holding a path separator
            or a control/format character.
    """
    if not isinstance(name, str):
        raise InvalidSettingsError(f"A preset name must be text, got {type(name).__name__}.")
    cleaned = unicodedata.normalize("NFC", name).strip()
    if not cleaned:
        raise InvalidSettingsError("A preset name cannot be empty.")
    if len(cleaned) > MAX_PRESET_NAME_LENGTH:
        raise InvalidSettingsError(
            f"Preset name is {len(cleaned)} characters long; use at most {MAX_PRESET_NAME_LENGTH}."
        )
    for char in cleaned:
        if char in "/\\" or unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            raise InvalidSettingsError(
                f"Preset name {cleaned!r} contains {char!r}; path separators and control characters are not "
                "allowed. Use letters, digits, spaces and punctuation."
            )
    return cleaned


# ---------------------------------------------------------------------------------------------------- built-ins
#: Built-in presets: only the keys each one changes; they are applied over :data:`DEFAULT_SETTINGS`.
#: They can be neither deleted nor overwritten (names compared case-insensitively).
BUILTIN_PRESETS: Mapping[str, Mapping[str, object]] = MappingProxyType({
    # Best quality for photos; "auto" precision = fp32 on CPU, fp16 on GPUs where the model supports it.
    "Photo quality": MappingProxyType(dict(model="RealESRGAN_x4plus", outscale=4.0, precision="auto",
                                           face_enhance=False, auto_settings=False)),
    "Anime": MappingProxyType(dict(model="RealESRGAN_x4plus_anime_6B", outscale=4.0, face_enhance=False,
                                   auto_settings=False)),
    # Compact SRVGG model (~8x fewer operations than RRDBNet; downloads on first use).
    "Fast on CPU": MappingProxyType(dict(model="realesr-general-x4v3", outscale=4.0, device="cpu", precision="fp32",
                                         denoise_strength=0.5, face_enhance=False, auto_settings=False)),
    "Old photo with faces": MappingProxyType(dict(model="RealESRGAN_x4plus", outscale=4.0, face_enhance=True,
                                                  face_strength=0.7, face_model="GFPGANv1.4",
                                                  auto_settings=False)),
})


# ---------------------------------------------------------------------------------------------------- documents
def _settings_document(data: object, lenient: bool = False) -> tuple[dict, list[str]]:
    """Validate a parsed settings.json; return (settings, warnings). Raises InvalidSettingsError."""
    _check_envelope(data, "settings")
    return validate_settings(data["settings"], lenient=lenient)


def _presets_document(data: object, lenient: bool = False) -> tuple[dict[str, dict], list[str]]:
    """Validate a parsed presets.json / export; return ({name: settings}, warnings). Raises InvalidSettingsError.

    ``lenient`` (files on disk): a value this version refuses falls back to its default with a warning."""
    _check_envelope(data, "presets")
    presets = data["presets"]
    if not isinstance(presets, Mapping):
        raise InvalidSettingsError('"presets" must be a JSON object mapping preset names to settings.')
    if len(presets) > MAX_PRESETS:
        raise InvalidSettingsError(f"{len(presets)} presets is more than the limit of {MAX_PRESETS}.")
    result: dict[str, dict] = {}
    warnings: list[str] = []
    for raw_name, values in presets.items():
        try:
            name = sanitize_preset_name(raw_name)
            settings, dropped = validate_settings(values, lenient=lenient)
        except InvalidSettingsError as exc:
            raise InvalidSettingsError(f"Preset {raw_name!r}: {exc}") from None
        if name in result:
            raise InvalidSettingsError(f"Preset {name!r} appears twice.")
        result[name] = settings
        warnings += [f"Preset {name!r}: {w}" for w in dropped]
    return result, warnings


def _check_envelope(data: object, key: str) -> None:
    if not isinstance(data, Mapping) or key not in data:
        raise InvalidSettingsError(f'Expected a JSON object with a "{key}" entry.')
    version = data.get("version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise InvalidSettingsError(f"Unsupported format version {version!r}; this app reads version {FORMAT_VERSION}.")


def _dump(key: str, payload: Mapping) -> bytes:
    return (json.dumps({"version": FORMAT_VERSION, key: payload}, indent=2, ensure_ascii=False, allow_nan=False)
            + "\n").encode("utf-8")


# ---------------------------------------------------------------------------------------------------- file helpers
def _atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new bytes, never a mix."""
    write_atomic(path, data)


def _parse(raw: bytes) -> object:
    """Decode and parse JSON; raise ValueError (JSONDecodeError/UnicodeDecodeError are ValueErrors)."""
    return json.loads(raw.decode("utf-8"))


# ---------------------------------------------------------------------------------------------------- manager
class SettingsManager:
    """Loads and saves last-used settings and presets in ``config_dir``; safe across threads and processes.

    Nothing is cached between calls: each call takes the lock and reads the file, so several managers (or app
    processes) on the same folder always agree. Construction creates ``config_dir`` and removes stale temp files.

    Attributes:
        warnings: messages the user must see (a corrupt file set aside, a backup restored, unknown keys
            dropped). Read them, or take and clear them with :meth:`pop_warnings`.
    """

    def __init__(self, config_dir: Path | str, builtin_presets: Mapping[str, Mapping] | None = None):
        self.config_dir = Path(config_dir)
        builtins = BUILTIN_PRESETS if builtin_presets is None else builtin_presets
        self._builtins: dict[str, dict] = {}
        for raw_name, values in builtins.items():
            name = sanitize_preset_name(raw_name)
            settings, dropped = validate_settings(values)
            if dropped:
                raise InvalidSettingsError(f"Built-in preset {name!r}: {'; '.join(dropped)}")
            self._builtins[name] = settings
        self._builtin_keys = {name.casefold() for name in self._builtins}
        self.warnings: list[str] = []
        self._warnings_lock = threading.Lock()
        try:
            self.config_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SettingsStorageError(
                f"Cannot create the settings folder {self.config_dir}: {exc.strerror or exc}. "
                "Check its permissions or set REALESRGAN_CONFIG_DIR to a writable folder."
            ) from exc
        import filelock  # only when a manager is built

        self._filelock_timeout = filelock.Timeout
        self._lock = filelock.FileLock(self.config_dir / LOCK_FILE, timeout=LOCK_TIMEOUT_S, poll_interval=0.005)
        with self._locked():
            self._remove_stale_temp_files()

    # ------------------------------------------------------------------ public API
    @property
    def settings_path(self) -> Path:
        return self.config_dir / SETTINGS_FILE

    @property
    def presets_path(self) -> Path:
        return self.config_dir / PRESETS_FILE

    def pop_warnings(self) -> list[str]:
        """Return the pending warnings and clear them."""
        with self._warnings_lock:
            taken, self.warnings[:] = list(self.warnings), []
        return taken

    def load_settings(self) -> dict:
        """Return the last saved settings (complete, see :data:`SETTINGS_SCHEMA`), or the defaults."""
        with self._locked():
            settings, _ = self._load(self.settings_path, "settings")
        return settings if settings is not None else dict(DEFAULT_SETTINGS)

    def save_settings(self, settings: Mapping) -> None:
        """Validate ``settings`` (missing keys take defaults) and store them as the last-used settings.

        Raises:
            InvalidSettingsError: a value has the wrong type or range (the file is left unchanged).
            SettingsStorageError: the file could not be written or locked.
        """
        validated, dropped = validate_settings(settings)
        self._warn(dropped)
        with self._locked():
            _, previous = self._load(self.settings_path, "settings")
            self._commit(self.settings_path, _dump("settings", validated), previous)

    def load_presets(self) -> dict[str, dict]:
        """Return every preset: ``{name: {"builtin": bool, "settings": dict}}``, built-ins first, then the user's
        in the order they were saved. Each ``settings`` is complete and a fresh copy."""
        with self._locked():
            user = self._load_user_presets()[0]
        presets = {name: {"builtin": True, "settings": dict(s)} for name, s in self._builtins.items()}
        presets.update({name: {"builtin": False, "settings": s} for name, s in user.items()})
        return presets

    def get_preset(self, name: str) -> dict:
        """Return a copy of the complete settings of preset ``name``.

        Raises:
            PresetNotFoundError: no such preset (the message lists the available ones).
        """
        key = sanitize_preset_name(name)
        if key in self._builtins:
            return dict(self._builtins[key])
        with self._locked():
            user = self._load_user_presets()[0]
        if key not in user:
            raise PresetNotFoundError(key, [*self._builtins, *user])
        return user[key]

    def save_preset(self, name: str, settings: Mapping) -> str:
        """Validate and store a user preset (replacing one of the same name). Returns the cleaned name.

        Raises:
            InvalidSettingsError: bad name or value.
            BuiltinPresetError: ``name`` is a built-in preset's name (compared case-insensitively).
            SettingsStorageError: the file could not be written or locked, or there are too many presets.
        """
        key = self._check_user_name(name)
        validated, dropped = validate_settings(settings)
        self._warn([f"Preset {key!r}: {w}" for w in dropped])
        with self._locked():
            user, previous = self._load_user_presets()
            user[key] = validated
            if len(user) > MAX_PRESETS:
                raise InvalidSettingsError(f"There are already {MAX_PRESETS} presets; delete some first.")
            self._commit(self.presets_path, _dump("presets", user), previous)
        return key

    def delete_preset(self, name: str) -> None:
        """Delete a user preset.

        Raises:
            BuiltinPresetError: ``name`` is a built-in preset.
            PresetNotFoundError: no user preset has this name.
        """
        key = sanitize_preset_name(name)
        if key.casefold() in self._builtin_keys:
            raise BuiltinPresetError(f"{key!r} is a built-in preset and cannot be deleted.")
        with self._locked():
            user, previous = self._load_user_presets()
            if key not in user:
                raise PresetNotFoundError(key, [*self._builtins, *user])
            del user[key]
            self._commit(self.presets_path, _dump("presets", user), previous)

    def export_presets(self, path: Path | str | None = None) -> str:
        """Return the user presets as JSON text (built-ins are not exported), also written to ``path`` if given.

        The text is the ``presets.json`` format, which :meth:`import_presets` reads.
        """
        with self._locked():
            user = self._load_user_presets()[0]
        data = _dump("presets", user)
        if path is not None:
            try:
                _atomic_write(Path(path), data)
            except OSError as exc:
                raise SettingsStorageError(f"Cannot write the preset export {path}: {exc.strerror or exc}.") from exc
        return data.decode("utf-8")

    def import_presets(self, json_text: str | bytes) -> list[str]:
        """Add the presets in ``json_text`` (an export) to the user presets, replacing same-named ones.

        All entries are validated first; if any is invalid nothing is imported.

        Returns:
            The names imported, in file order.

        Raises:
            InvalidSettingsError: not JSON, too large, wrong shape, a bad name or value (the message names the
                preset and key), or a built-in preset's name (:class:`BuiltinPresetError`).
        """
        raw = json_text.encode("utf-8") if isinstance(json_text, str) else bytes(json_text)
        if len(raw) > MAX_IMPORT_BYTES:
            raise InvalidSettingsError(
                f"The preset file is {len(raw)} bytes; the limit is {MAX_IMPORT_BYTES} bytes."
            )
        try:
            data = _parse(raw)
        except (ValueError, RecursionError) as exc:
            raise InvalidSettingsError(f"The preset file is not valid JSON: {exc or type(exc).__name__}.") from None
        imported, dropped = _presets_document(data)
        for name in imported:
            if name.casefold() in self._builtin_keys:
                raise BuiltinPresetError(
                    f"The preset file contains {name!r}, the name of a built-in preset; rename it and import again."
                )
        self._warn(dropped)
        with self._locked():
            user, previous = self._load_user_presets()
            user.update(imported)
            if len(user) > MAX_PRESETS:
                raise InvalidSettingsError(
                    f"Importing would make {len(user)} presets, more than the limit of {MAX_PRESETS}."
                )
            self._commit(self.presets_path, _dump("presets", user), previous)
        return list(imported)

    # ------------------------------------------------------------------ internals (callers hold the lock)
    @contextlib.contextmanager
    def _locked(self):
        try:
            self._lock.acquire()
        except self._filelock_timeout:
            raise SettingsStorageError(
                f"The settings in {self.config_dir} stayed locked by another process for {LOCK_TIMEOUT_S:g} s. "
                "Try again; if it persists, close other running copies of the app."
            ) from None
        try:
            yield
        finally:
            self._lock.release()

    def _warn(self, messages: list[str]) -> None:
        with self._warnings_lock:
            for message in messages:
                if message not in self.warnings:  # a file read again and again warns once until popped
                    logger.warning("%s", message)
                    self.warnings.append(message)

    def _check_user_name(self, name: object) -> str:
        key = sanitize_preset_name(name)
        if key.casefold() in self._builtin_keys:
            raise BuiltinPresetError(f"{key!r} is a built-in preset and cannot be overwritten; choose another name.")
        return key

    def _load_user_presets(self) -> tuple[dict[str, dict], bytes | None]:
        presets, raw = self._load(self.presets_path, "presets")
        if presets is None:
            return {}, raw
        # A hand-edited file could hold a built-in's name; the built-in wins and the entry is ignored.
        shadowing = [name for name in presets if name.casefold() in self._builtin_keys]
        for name in shadowing:
            del presets[name]
        self._warn([f"User preset {name!r} has the name of a built-in preset and was ignored." for name in shadowing])
        return presets, raw

    def _load(self, path: Path, key: str) -> tuple[dict | None, bytes | None]:
        """Read and validate ``path``, repairing it if corrupt.

        Returns:
            ``(value, raw)``: the validated payload (None when there is no usable file, i.e. defaults) and the
            valid bytes now on disk (None when there is no file), which the next commit copies to ``.bak``.
        """
        validate = _settings_document if key == "settings" else _presets_document
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            raise SettingsStorageError(f"Cannot read {path}: {exc.strerror or exc}.") from exc
        try:
            value, dropped = validate(_parse(raw), lenient=True)
        except (ValueError, RecursionError) as exc:  # JSON, UTF-8 and schema errors are all ValueErrors
            return self._recover(path, validate, reason=str(exc) or type(exc).__name__)
        self._warn([f"{path.name}: {w}" for w in dropped])
        return value, raw

    def _recover(self, path: Path, validate, reason: str) -> tuple[dict | None, bytes | None]:
        aside = self._set_aside(path)
        backup = path.with_name(path.name + ".bak")
        try:
            raw = backup.read_bytes()
            value, _ = validate(_parse(raw), lenient=True)
        except (OSError, ValueError, RecursionError):
            self._warn([f"{path.name} was corrupt ({reason}); it was kept as {aside.name} and defaults are used "
                        "(no valid backup was found)."])
            return None, None
        try:
            _atomic_write(path, raw)
        except OSError as exc:
            raise SettingsStorageError(f"Cannot restore {path} from its backup: {exc.strerror or exc}.") from exc
        self._warn([f"{path.name} was corrupt ({reason}); it was kept as {aside.name} and the backup was restored."])
        return value, raw

    def _set_aside(self, path: Path) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = path.with_name(f"{path.name}.corrupt-{stamp}")
        counter = 1
        while aside.exists():
            aside = path.with_name(f"{path.name}.corrupt-{stamp}-{counter}")
            counter += 1
        try:
            os.replace(path, aside)
            fsync_dir(path.parent)
        except OSError as exc:
            raise SettingsStorageError(f"Cannot set aside the corrupt file {path}: {exc.strerror or exc}.") from exc
        logger.warning("Corrupt %s moved to %s", path, aside)
        return aside

    def _commit(self, path: Path, data: bytes, previous: bytes | None) -> None:
        """Copy the valid ``previous`` bytes to ``<path>.bak``, then atomically replace ``path`` with ``data``."""
        try:
            if previous is not None:
                _atomic_write(path.with_name(path.name + ".bak"), previous)
            _atomic_write(path, data)
        except OSError as exc:
            raise SettingsStorageError(
                f"Cannot save {path}: {exc.strerror or exc}. Check free disk space and the folder's permissions."
            ) from exc

    def _remove_stale_temp_files(self) -> None:
        # Writers hold the lock for the whole life of their temp file, so any temp file seen here is stale.
        for name in (SETTINGS_FILE, PRESETS_FILE):
            for stale in self.config_dir.glob(f".{name}.*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
                    logger.info("Removed stale temp file %s left by an interrupted save", stale)
