"""Settings and presets persistence: validation, round trips, corruption recovery, concurrency and SIGKILL safety."""

from __future__ import annotations

import inspect
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.catalog import CATALOG
from engine.errors import InvalidSettingsError
from engine.settings_manager import (
    BUILTIN_PRESETS,
    DEFAULT_SETTINGS,
    SETTINGS_SCHEMA,
    BuiltinPresetError,
    PresetNotFoundError,
    SettingsManager,
    sanitize_preset_name,
    validate_settings,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _user_presets_on_disk(config_dir: Path) -> dict:
    return json.loads((config_dir / "presets.json").read_text("utf-8"))["presets"]


# ------------------------------------------------------------------------------------------------ validation
def test_defaults_are_valid_and_cover_the_schema():
    settings, warnings = validate_settings({})
    assert settings == dict(DEFAULT_SETTINGS)
    assert list(settings) == list(SETTINGS_SCHEMA)
    assert warnings == []


@pytest.mark.parametrize("key, value", [
    ("model", 3), ("model", ""), ("outscale", "4"), ("outscale", 0.5), ("outscale", 8.5), ("outscale", True),
    ("outscale", float("nan")), ("tile", -1), ("tile", 256.0), ("tile", "big"), ("tile_overlap", -2),
    ("tile_overlap", "10"), ("denoise_strength", 1.5), ("face_enhance", 1), ("face_enhance", "true"),
    ("face_strength", -0.1), ("precision", "fp8"), ("device", None), ("output_format", "gif"), ("quality", 0),
    ("quality", 101), ("quality", 90.5), ("alpha_mode", "none"), ("auto_settings", "yes"),
])
def test_wrong_type_or_range_is_rejected_naming_the_key(key, value):
    with pytest.raises(ValueError, match=repr(key)) as info:
        validate_settings({key: value})
    assert isinstance(info.value, InvalidSettingsError)


def test_valid_values_are_canonicalised():
    settings, _ = validate_settings({"outscale": 2, "model": "auto", "quality": 100, "precision": "bf16",
                                     "output_format": "webp", "tile": 0})
    assert settings["outscale"] == 2.0 and isinstance(settings["outscale"], float)
    assert settings["tile"] == 0 and settings["model"] == "auto" and settings["precision"] == "bf16"
    assert validate_settings({"tile": "auto"})[0]["tile"] == "auto"


def test_unknown_keys_are_dropped_with_a_warning(tmp_path):
    settings, warnings = validate_settings({"scale": 4, "outscale": 3})
    assert "scale" not in settings and settings["outscale"] == 3.0
    assert len(warnings) == 1 and "'scale'" in warnings[0]

    manager = SettingsManager(tmp_path)
    manager.save_settings({"outscale": 2, "colour": "red"})
    assert any("'colour'" in w for w in manager.warnings)
    assert "colour" not in manager.load_settings()
    assert manager.pop_warnings() and manager.warnings == []


def test_non_mapping_settings_rejected():
    with pytest.raises(InvalidSettingsError):
        validate_settings(["outscale", 4])


@pytest.mark.parametrize("raw, expected", [("  My preset ", "My preset"), ("Été 2024 ×4", "Été 2024 ×4"),
                                           ("x" * 64, "x" * 64), ("e\u0301", "\u00e9")])
def test_preset_names_are_cleaned(raw, expected):
    assert sanitize_preset_name(raw) == expected


@pytest.mark.parametrize("raw", ["", "   ", "x" * 65, "a/b", "a\\b", "../etc", "bad\nname", "nul\x00",
                                 "bidi\u202eoverride", "zero\u200bwidth", 42, None])
def test_bad_preset_names_are_rejected(raw, tmp_path):
    with pytest.raises(InvalidSettingsError):
        sanitize_preset_name(raw)
    with pytest.raises(InvalidSettingsError):
        SettingsManager(tmp_path).save_preset(raw, {})


# ------------------------------------------------------------------------------------------------ round trips
def test_empty_folder_gives_defaults_without_warnings(tmp_path):
    manager = SettingsManager(tmp_path / "new" / "dir")
    assert manager.load_settings() == dict(DEFAULT_SETTINGS)
    assert [name for name, p in manager.load_presets().items() if not p["builtin"]] == []
    assert manager.warnings == []


def test_last_used_settings_survive_a_restart(tmp_path):
    wanted = dict(DEFAULT_SETTINGS, model="RealESRGAN_x4plus_anime_6B", outscale=2.5, tile=128, face_enhance=True,
                  face_strength=0.3, precision="fp16", device="cuda:1", output_format="png", quality=80,
                  alpha_mode="bicubic", auto_settings=False)
    SettingsManager(tmp_path).save_settings(wanted)
    assert SettingsManager(tmp_path).load_settings() == wanted


def test_partial_settings_are_completed_from_defaults(tmp_path):
    manager = SettingsManager(tmp_path)
    manager.save_settings({"outscale": 3})
    assert manager.load_settings() == dict(DEFAULT_SETTINGS, outscale=3.0)


def test_invalid_save_leaves_the_file_unchanged(tmp_path):
    manager = SettingsManager(tmp_path)
    manager.save_settings({"quality": 70})
    before = manager.settings_path.read_bytes()
    with pytest.raises(ValueError, match="'quality'"):
        manager.save_settings({"quality": 700})
    assert manager.settings_path.read_bytes() == before


def test_presets_round_trip_across_restart(tmp_path):
    manager = SettingsManager(tmp_path)
    assert manager.save_preset("  Mine ", {"outscale": 2, "face_enhance": True}) == "Mine"
    manager.save_preset("Second", {"model": "realesr-animevideov3"})
    presets = SettingsManager(tmp_path).load_presets()
    assert list(presets)[:len(BUILTIN_PRESETS)] == list(BUILTIN_PRESETS)
    assert presets["Mine"] == {"builtin": False, "settings": dict(DEFAULT_SETTINGS, outscale=2.0, face_enhance=True)}
    assert presets["Second"]["settings"]["model"] == "realesr-animevideov3"
    assert SettingsManager(tmp_path).get_preset("Mine")["outscale"] == 2.0

    manager.save_preset("Mine", {"outscale": 6})  # replaces
    assert manager.get_preset("Mine")["outscale"] == 6.0
    manager.delete_preset("Mine")
    assert "Mine" not in SettingsManager(tmp_path).load_presets()


def test_returned_presets_are_copies(tmp_path):
    manager = SettingsManager(tmp_path)
    manager.get_preset("Anime")["model"] = "changed"
    manager.load_presets()["Anime"]["settings"]["model"] = "changed"
    assert manager.get_preset("Anime")["model"] == "RealESRGAN_x4plus_anime_6B"


def test_missing_preset_is_a_clear_key_error(tmp_path):
    manager = SettingsManager(tmp_path)
    with pytest.raises(PresetNotFoundError) as info:
        manager.get_preset("Nope")
    assert isinstance(info.value, KeyError)
    assert "'Nope'" in str(info.value) and "Anime" in str(info.value)
    with pytest.raises(PresetNotFoundError):
        manager.delete_preset("Nope")


# ------------------------------------------------------------------------------------------------ built-ins
def test_builtin_presets_match_the_catalog(tmp_path):
    assert set(BUILTIN_PRESETS) == {"Photo quality", "Anime", "Fast on CPU", "Old photo with faces"}
    presets = SettingsManager(tmp_path).load_presets()
    for name in BUILTIN_PRESETS:
        settings = presets[name]["settings"]
        assert presets[name]["builtin"] is True
        assert CATALOG[settings["model"]].kind == "sr"
        assert CATALOG[settings["face_model"]].kind == "face"
    assert presets["Photo quality"]["settings"]["model"] == "RealESRGAN_x4plus"
    assert presets["Anime"]["settings"]["model"] == "RealESRGAN_x4plus_anime_6B"
    fast = presets["Fast on CPU"]["settings"]
    assert CATALOG[fast["model"]].arch == "SRVGGNetCompact" and fast["device"] == "cpu"
    old = presets["Old photo with faces"]["settings"]
    assert old["model"] == "RealESRGAN_x4plus" and old["face_enhance"] is True and old["face_strength"] == 0.7


def test_builtins_cannot_be_deleted_or_overwritten(tmp_path):
    manager = SettingsManager(tmp_path)
    with pytest.raises(BuiltinPresetError, match="cannot be deleted"):
        manager.delete_preset("Anime")
    for name in ("Anime", "anime", " PHOTO QUALITY "):
        with pytest.raises(BuiltinPresetError, match="cannot be overwritten"):
            manager.save_preset(name, {"outscale": 2})
    assert manager.get_preset("Anime")["outscale"] == 4.0
    assert not manager.presets_path.exists()


def test_custom_builtins_are_validated(tmp_path):
    manager = SettingsManager(tmp_path, builtin_presets={"Only": {"outscale": 2}})
    assert [n for n, p in manager.load_presets().items() if p["builtin"]] == ["Only"]
    with pytest.raises(InvalidSettingsError, match="'outscale'"):
        SettingsManager(tmp_path, builtin_presets={"Bad": {"outscale": 20}})


def test_a_hand_edited_builtin_name_in_the_file_is_ignored(tmp_path):
    (tmp_path / "presets.json").write_text(json.dumps({"version": 1, "presets": {"anime": {"outscale": 2}}}))
    manager = SettingsManager(tmp_path)
    assert manager.get_preset("Anime")["outscale"] == 4.0
    assert "anime" not in manager.load_presets()
    assert any("built-in" in w for w in manager.warnings)


# ------------------------------------------------------------------------------------------------ recovery
def _two_versions(tmp_path: Path) -> SettingsManager:
    manager = SettingsManager(tmp_path)
    manager.save_preset("First", {"outscale": 2})
    manager.save_preset("Second", {"outscale": 3})
    return manager


def test_bak_holds_the_previous_version(tmp_path):
    _two_versions(tmp_path)
    bak = json.loads((tmp_path / "presets.json.bak").read_text("utf-8"))
    assert list(bak["presets"]) == ["First"]
    assert list(_user_presets_on_disk(tmp_path)) == ["First", "Second"]


@pytest.mark.parametrize("damage", [
    lambda raw: b"\x00garbage{{{",                              # corrupt
    lambda raw: raw[: len(raw) // 2],                          # truncated
    lambda raw: b"",                                           # empty (lost write)
    lambda raw: b'{"version": 1, "presets": []}',             # wrong shape
    lambda raw: b'{"version": 1, "presets": {"a/b": {}}}',    # bad preset name
    lambda raw: b"\xff\xfe not utf-8",
    lambda raw: b"[" * 100_000,                                # nesting too deep for the parser
], ids=["garbage", "truncated", "empty", "shape", "name", "encoding", "deep"])
def test_corrupt_presets_are_set_aside_and_backup_restored(tmp_path, damage):
    _two_versions(tmp_path)
    damaged = damage((tmp_path / "presets.json").read_bytes())
    (tmp_path / "presets.json").write_bytes(damaged)

    manager = SettingsManager(tmp_path)
    presets = manager.load_presets()
    assert "First" in presets and "Second" not in presets  # the .bak version
    aside = list(tmp_path.glob("presets.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == damaged
    assert len(manager.warnings) == 1
    warning = manager.warnings[0]
    assert "presets.json was corrupt" in warning and aside[0].name in warning and "backup was restored" in warning
    # The restore is on disk: a new manager reads the backup's version without any warning.
    again = SettingsManager(tmp_path)
    assert list(_user_presets_on_disk(tmp_path)) == ["First"] and "First" in again.load_presets()
    assert again.warnings == []


def test_truncated_settings_without_backup_fall_back_to_defaults(tmp_path):
    SettingsManager(tmp_path).save_settings({"outscale": 2})
    raw = (tmp_path / "settings.json").read_bytes()
    (tmp_path / "settings.json").write_bytes(raw[:-20])
    manager = SettingsManager(tmp_path)
    assert manager.load_settings() == dict(DEFAULT_SETTINGS)
    assert len(manager.warnings) == 1 and "defaults are used" in manager.warnings[0]
    assert [p.read_bytes() for p in tmp_path.glob("settings.json.corrupt-*")] == [raw[:-20]]
    manager.save_settings({"outscale": 5})  # the app carries on
    assert SettingsManager(tmp_path).load_settings()["outscale"] == 5.0


def test_invalid_backup_is_not_used(tmp_path):
    manager = _two_versions(tmp_path)
    (tmp_path / "presets.json.bak").write_text("{not json")
    (tmp_path / "presets.json").write_text('{"version": 1, "presets": ["X"]}')
    assert [n for n, p in manager.load_presets().items() if not p["builtin"]] == []
    assert "defaults are used" in manager.warnings[0]


def test_corrupt_files_set_aside_twice_keep_both(tmp_path):
    for _ in range(2):
        (tmp_path / "settings.json").write_text("{")
        SettingsManager(tmp_path).load_settings()
    assert len(list(tmp_path.glob("settings.json.corrupt-*"))) == 2


def test_newer_format_version_is_set_aside_not_misread(tmp_path):
    (tmp_path / "settings.json").write_text('{"version": 2, "settings": {}}')
    manager = SettingsManager(tmp_path)
    assert manager.load_settings() == dict(DEFAULT_SETTINGS)
    assert "version" in manager.warnings[0]


def test_stale_temp_files_are_removed_at_start(tmp_path):
    stale = [tmp_path / ".presets.json.k1l2e3d.tmp", tmp_path / ".settings.json.abc.tmp",
             tmp_path / ".presets.json.bak.xyz.tmp"]
    for path in stale:
        path.write_text('{"half": ')
    unrelated = tmp_path / "notes.tmp"
    unrelated.write_text("keep me")
    SettingsManager(tmp_path)
    assert not any(path.exists() for path in stale)
    assert unrelated.read_text() == "keep me"


def test_saving_leaves_no_temp_files(tmp_path):
    manager = _two_versions(tmp_path)
    manager.save_settings({})
    manager.export_presets(tmp_path / "export.json")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


# ------------------------------------------------------------------------------------------------ export / import
def test_export_import_round_trip(tmp_path):
    source = SettingsManager(tmp_path / "a")
    source.save_preset("Portraits", {"face_enhance": True, "face_strength": 0.9})
    source.save_preset("Small", {"outscale": 1.5, "output_format": "jpg", "quality": 85})
    text = source.export_presets(tmp_path / "export.json")
    assert (tmp_path / "export.json").read_text("utf-8") == text
    assert set(json.loads(text)["presets"]) == {"Portraits", "Small"}  # built-ins are not exported

    target = SettingsManager(tmp_path / "b")
    target.save_preset("Small", {"outscale": 7})
    assert target.import_presets(text) == ["Portraits", "Small"]
    assert SettingsManager(tmp_path / "b").get_preset("Small") == source.get_preset("Small")
    assert target.get_preset("Portraits")["face_strength"] == 0.9


@pytest.mark.parametrize("text, match", [
    ("not json", "not valid JSON"),
    ('["a"]', "presets"),
    ('{"version": 1, "presets": {"Ok": {"outscale": 2}, "Bad": {"outscale": 99}}}', "'Bad'.*'outscale'"),
    ('{"version": 1, "presets": {"a/b": {}}}', "path separators"),
    ('{"version": 1, "presets": {"Anime": {}}}', "built-in"),
    ('{"version": 1, "presets": {"Ok": "fast"}}', "'Ok'"),
    ('{"version": 9, "presets": {}}', "version"),
])
def test_invalid_import_is_rejected_and_imports_nothing(tmp_path, text, match):
    manager = SettingsManager(tmp_path)
    manager.save_preset("Existing", {"outscale": 2})
    before = manager.presets_path.read_bytes()
    with pytest.raises(InvalidSettingsError, match=match):
        manager.import_presets(text)
    assert manager.presets_path.read_bytes() == before


def test_oversized_import_is_rejected(tmp_path):
    with pytest.raises(InvalidSettingsError, match="limit"):
        SettingsManager(tmp_path).import_presets(" " * (3 * 1024 * 1024))


# ------------------------------------------------------------------------------------------------ concurrency
_WRITER = r"""
import sys, time
from pathlib import Path
from engine.settings_manager import SettingsManager
config_dir, prefix, count, go = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
manager = SettingsManager(config_dir)
print("ready", flush=True)
while not go.exists():
    time.sleep(0.002)
for i in range(count):
    manager.save_preset(f"{prefix}{i}", {"outscale": 1 + (i % 7), "quality": 1 + i})
    manager.save_settings({"quality": 1 + i, "device": {"a": "cpu", "b": "cuda:1"}[prefix]})
assert manager.warnings == [], manager.warnings
"""


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    go = tmp_path / "go"
    config_dir = tmp_path / "cfg"
    children = [subprocess.Popen([sys.executable, "-c", _WRITER, str(config_dir), prefix, "15", str(go)],
                                 cwd=REPO_ROOT, env=_child_env(), stdout=subprocess.PIPE, text=True)
                for prefix in ("a", "b")]
    for child in children:
        assert child.stdout.readline().strip() == "ready"
    go.touch()
    for child in children:
        assert child.wait(timeout=60) == 0
    presets = _user_presets_on_disk(config_dir)
    assert set(presets) == {f"{p}{i}" for p in "ab" for i in range(15)}
    assert all(presets[f"{p}{i}"]["quality"] == 1 + i for p in "ab" for i in range(15))
    settings = SettingsManager(config_dir).load_settings()
    assert settings["quality"] == 15 and settings["device"] in ("cpu", "cuda:1")
    assert json.loads((config_dir / "presets.json.bak").read_text("utf-8"))["presets"]


def test_threads_writing_at_once_lose_nothing(tmp_path):
    shared = SettingsManager(tmp_path)
    errors: list[BaseException] = []

    def write(prefix: str, manager: SettingsManager) -> None:
        try:
            for i in range(8):
                manager.save_preset(f"{prefix}{i}", {"quality": 10 + i})
                manager.load_presets()
        except BaseException as exc:  # surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(f"t{n}-", shared if n % 2 else SettingsManager(tmp_path)))
               for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert set(_user_presets_on_disk(tmp_path)) == {f"t{n}-{i}" for n in range(4) for i in range(8)}


# ------------------------------------------------------------------------------------------------ kill test
def _settings_for(i: int) -> dict:
    """The settings the killed writer saves as its i-th preset (content grows with i)."""
    return {"outscale": 1 + i % 8, "quality": 1 + i % 100, "tile": 16 + i % 8000, "device": f"cuda:{i * 7919}"}


def _preset_name(i: int) -> str:
    return f"p{i:05d}-" + "n" * 40


_KILLED_WRITER = inspect.getsource(_settings_for) + inspect.getsource(_preset_name) + r"""
import os, sys
from pathlib import Path
from engine.settings_manager import SettingsManager

config_dir, log_path = Path(sys.argv[1]), sys.argv[2]
manager = SettingsManager(config_dir)
log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
i = 1 + sum(1 for p in manager.load_presets().values() if not p["builtin"])
os.write(log, b"ready\n")
while True:
    os.write(log, f"begin {i}\n".encode())      # logged before the save starts ...
    manager.save_preset(_preset_name(i), _settings_for(i))
    os.write(log, f"done {i}\n".encode())       # ... and after it returned (committed)
    i += 1
"""


def _expected_presets(count: int) -> dict:
    return {_preset_name(i): validate_settings(_settings_for(i))[0] for i in range(1, count + 1)}


def test_sigkill_during_saves_never_leaves_a_broken_file(tmp_path):
    """Kill a writer at random moments; each time the file must be exactly the last or the next committed version."""
    if not hasattr(signal, "SIGKILL"):
        pytest.skip("needs SIGKILL")
    rng = random.Random(1234)
    config_dir = tmp_path / "cfg"
    committed = 0  # presets on disk after the previous kill
    expected_cache: dict[int, dict] = {}
    stale_temp_seen = 0
    kills = 12  # a fixed count, not "as many as fit in N seconds": a loaded machine must not fail the test
    for iterations in range(1, kills + 1):
        log_path = tmp_path / f"log{iterations}"
        child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(config_dir), str(log_path)],
                                 cwd=REPO_ROOT, env=_child_env(), stderr=subprocess.PIPE)
        # The first writer commits at least once, so the later kills have a file to break; the others start.
        awaited = b"done " if iterations == 1 else b"ready\n"
        deadline = time.monotonic() + 120  # a bound for a hung child only
        while not (log_path.exists() and awaited in log_path.read_bytes()):
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "writer did not start"
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.25))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stderr.close()

        lines = log_path.read_text().split()
        begins = [int(n) for word, n in zip(lines[1::2], lines[2::2]) if word == "begin"]
        dones = [int(n) for word, n in zip(lines[1::2], lines[2::2]) if word == "done"]
        if begins:
            assert begins[0] == committed + 1, "the writer must resume from the version on disk"
        last_done = dones[-1] if dones else committed
        last_begin = begins[-1] if begins else committed
        allowed = {last_done, last_begin}

        stale_temp_seen += any(p.name.endswith(".tmp") for p in config_dir.iterdir())
        on_disk = _user_presets_on_disk(config_dir) if (config_dir / "presets.json").exists() else {}
        assert len(on_disk) in allowed, (len(on_disk), allowed)
        for count in allowed:
            expected_cache.setdefault(count, _expected_presets(count))
        assert on_disk == expected_cache[len(on_disk)]
        committed = len(on_disk)

    assert committed > 0
    final = SettingsManager(config_dir)
    assert final.warnings == [] and not [p for p in config_dir.iterdir() if p.name.endswith(".tmp")]
    assert len([p for p in final.load_presets().values() if not p["builtin"]]) == committed
    assert final.warnings == []
    print(f"{iterations} kills, {committed} presets committed, stale temp file left by {stale_temp_seen} kills")


def test_an_old_preset_with_a_value_the_model_refuses_loads_with_that_field_reset(tmp_path):
    """tile 8 used to save (the old schema took any tile >= 0) and then fail every enhance: now it loads, the
    warning names the field, and only that field falls back."""
    (tmp_path / "presets.json").write_text(json.dumps({"version": 1, "presets": {
        "Old": {"model": "RealESRGAN_x4plus_anime_6B", "outscale": 3.0, "tile": 8, "quality": 80}}}))
    manager = SettingsManager(tmp_path)
    old = manager.get_preset("Old")
    assert old["tile"] == DEFAULT_SETTINGS["tile"]
    assert (old["model"], old["outscale"], old["quality"]) == ("RealESRGAN_x4plus_anime_6B", 3.0, 80)
    assert any("'tile'" in w for w in manager.pop_warnings())
    assert (tmp_path / "presets.json").exists() and not list(tmp_path.glob("presets.json.corrupt-*"))


def test_a_value_that_saves_is_a_value_that_runs(tmp_path):
    from engine.settings import EnhanceSettings

    manager = SettingsManager(tmp_path)
    with pytest.raises(InvalidSettingsError, match="'tile'"):
        manager.save_preset("Tiny tiles", {"tile": 8})
    manager.save_preset("Small tiles", {"tile": 16, "tile_overlap": 256})
    EnhanceSettings.from_mapping(manager.get_preset("Small tiles"))
