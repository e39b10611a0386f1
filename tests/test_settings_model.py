"""The one settings model: every interface is generated from it, a value one accepts runs, explicit values win."""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.errors import InvalidSettingsError
from engine.settings import (ADVISED, DEFAULTS, FIELDS, Advice, EnhanceSettings, FieldSpec, add_cli_arguments,
                             explicit_from_cli, merge, stored_fields)

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
FAST = "realesr-animevideov3"


def boundary_values(spec: FieldSpec) -> list[object]:
    """The edges of what a setting accepts, read from its spec."""
    if spec.kind == "bool":
        return [False, True]
    if spec.kind == "choice":
        return list(spec.choice_values())
    if spec.kind == "text":
        return ["auto", "cpu", "cuda:0"]
    number = int if spec.kind == "int" else float
    values = [number(spec.minimum), number(spec.maximum), *spec.special]
    values += ["auto"] if spec.allow_auto else []
    values += [None] if spec.nullable else []
    return values


def refused_values(spec: FieldSpec) -> list[object]:
    if spec.kind in ("choice", "text"):
        return ["not-a-choice"]
    if spec.kind == "bool":
        return ["maybe"]
    step = 1 if spec.kind == "int" else 0.01
    refused = [spec.minimum - step, spec.maximum + step]
    if spec.special:  # just outside the special values too (tile 8 used to save and then fail every run)
        refused.append(int(spec.minimum) // 2)
    return refused


CASES = [(name, value) for name, spec in FIELDS.items() for value in boundary_values(spec)]
REFUSED = [(name, value) for name, spec in FIELDS.items() for value in refused_values(spec)]


@pytest.mark.parametrize("name, value", CASES)
def test_every_boundary_value_is_accepted_everywhere_it_is_offered(name, value, tmp_path):
    spec = FIELDS[name]
    settings = EnhanceSettings(**{name: value})
    assert getattr(settings, name) == value
    if spec.stored:  # presets and the form
        from engine.settings_manager import SettingsManager
        from ui.form import FORM_KEYS, settings_to_widget_values, widget_values_to_settings

        manager = SettingsManager(tmp_path)
        manager.save_preset("edge", {name: value})
        stored = manager.get_preset("edge")
        assert EnhanceSettings.from_mapping(stored) == settings
        values = settings_to_widget_values(stored)
        assert widget_values_to_settings(values)[name] == value
        assert len(values) == len(FORM_KEYS)
    if spec.cli is not None and value is not None:
        parser = argparse.ArgumentParser()
        add_cli_arguments(parser)
        flag = ([spec.cli] if value is True else [f"--no-{spec.cli[2:]}"] if value is False
                else [spec.cli, str(value)])
        assert EnhanceSettings.from_mapping(explicit_from_cli(parser.parse_args(flag))) == settings
    if spec.rest is not None and value is not None:
        from ui.rest_api import explicit_from_form

        assert EnhanceSettings.from_mapping(explicit_from_form({spec.rest: value})) == settings


@pytest.mark.parametrize("name, value", REFUSED)
def test_values_out_of_range_are_refused_everywhere_with_the_setting_named(name, value, tmp_path):
    spec = FIELDS[name]
    with pytest.raises(InvalidSettingsError, match=f"'{name}'"):
        EnhanceSettings(**{name: value})
    if spec.stored:
        from engine.settings_manager import SettingsManager

        with pytest.raises(InvalidSettingsError, match=f"'{name}'"):
            SettingsManager(tmp_path).save_preset("edge", {name: value})
    if spec.cli is not None and spec.kind not in ("bool", "choice"):
        parser = argparse.ArgumentParser(exit_on_error=False)
        add_cli_arguments(parser)
        with pytest.raises(argparse.ArgumentError, match=name):
            parser.parse_args([spec.cli, str(value)])


def test_the_smallest_tile_and_the_widest_overlap_really_run(model_manager_session):
    from engine.processor import enhance_image_direct

    image = np.asarray(Image.open(DATA / "upscaler" / "ost_009_crop192.png").convert("RGB"))[:40, :40]
    tile = FIELDS["tile"]
    result = enhance_image_direct(image, EnhanceSettings(model=FAST, tile=int(tile.minimum),
                                                         tile_overlap=int(FIELDS["tile_overlap"].maximum),
                                                         quality_metrics=False), model_manager_session)
    assert result.size == (160, 160) and result.tile == 16


def test_argparse_choices_equal_the_models():
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    actions = {a.dest: a for a in parser._actions}
    for name, spec in FIELDS.items():
        if spec.cli is None:
            continue
        assert actions[name].option_strings[0] == spec.cli
        if spec.kind == "choice":
            assert tuple(actions[name].choices) == spec.choice_values()


@pytest.mark.parametrize("command", ["enhance", "analyze", "video", "models", "ui"])
def test_every_subcommand_prints_its_help(command):
    """``main.py video --help`` crashed with argparse's "empty group" traceback: the video command offers no size
    flag, and the size flags' mutually exclusive group was made empty."""
    from main import build_parser

    subcommand = build_parser()._subparsers._group_actions[0].choices[command]
    assert subcommand.format_help().startswith(f"usage: main.py {command}")


def test_the_size_flags_stay_exclusive(capsys):
    from main import build_parser

    parser = build_parser()
    assert "[--width TARGET_WIDTH | --height TARGET_HEIGHT | --max-side MAX_SIDE]" in " ".join(
        parser._subparsers._group_actions[0].choices["enhance"].format_usage().split())
    with pytest.raises(SystemExit):
        parser.parse_args(["enhance", "x.png", "-o", "y.png", "--width", "64", "--max-side", "64"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_openapi_enums_and_ranges_equal_the_models(config):
    from fastapi import FastAPI

    from ui.rest_api import install_api, rest_fields
    from ui.services import create_services

    app = FastAPI()
    install_api(app, create_services(config))
    spec = app.openapi()
    body = spec["paths"]["/api/v1/enhance"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    props = spec["components"]["schemas"][body["$ref"].split("/")[-1]]["properties"]
    for rest, (name, field_spec) in rest_fields().items():
        options = [o for o in props[rest]["anyOf"] if o.get("type") != "null"]
        if field_spec.kind == "choice":
            assert options[0]["enum"] == list(field_spec.choice_values())
        elif field_spec.kind in ("int", "float"):
            assert (options[0]["minimum"], options[0]["maximum"]) == (field_spec.minimum, field_spec.maximum)
            consts = {o["const"] for o in options[1:]}
            assert consts == set(field_spec.special) | ({"auto"} if field_spec.allow_auto else set())


def test_form_widgets_have_the_models_choices_and_ranges():
    import gradio as gr

    from ui.form import FORM_KEYS, render_form
    from engine.settings_manager import DEFAULT_SETTINGS

    assert FORM_KEYS == tuple(stored_fields())
    with gr.Blocks():
        form = render_form(dict(DEFAULT_SETTINGS))
    for name in FORM_KEYS:
        spec, widget = stored_fields()[name], form.widgets[name]
        if isinstance(widget, gr.Slider):
            assert (widget.minimum, widget.maximum) == (spec.minimum, spec.maximum)
        elif isinstance(widget, gr.Dropdown):
            values = [value for _label, value in widget.choices]
            if spec.kind == "choice" and name not in ("model",):
                assert tuple(values) == spec.choice_values()
            elif name == "model":
                assert tuple(values) == spec.choice_values()
            else:  # free values: every suggestion is one the model accepts, and others may be typed
                assert widget.allow_custom_value
                for value in values:
                    spec.coerce(name, value)
        else:
            assert isinstance(widget, gr.Checkbox) and spec.kind == "bool"


# ------------------------------------------------------------------------------------------------ merge
def test_explicit_values_always_win_over_the_advice():
    advice = Advice(settings=EnhanceSettings(model="RealESRGAN_x4plus", outscale=4.0, precision="fp32",
                                             face_enhance=True, denoise_strength=0.9), reasons=("r",))
    merged = merge(advice, {"outscale": 2.0, "tile": 128, "precision": "bf16"})
    assert (merged.outscale, merged.tile, merged.precision) == (2.0, 128, "bf16")
    assert merged.model == "RealESRGAN_x4plus" and merged.face_enhance is True and merged.denoise_strength == 0.9
    sized = merge(advice, {"max_side": 1000})
    assert sized.max_side == 1000 and sized.outscale is None
    assert merge(None, {"quality": 70}).quality == 70 and merge(None, {}) == EnhanceSettings()
    assert Advice.from_dict(json.loads(json.dumps(advice.as_dict()))) == advice
    assert ADVISED == {"model", "outscale", "tile", "denoise_strength", "face_enhance", "precision"}


def test_auto_batch_keeps_the_values_the_user_changed_on_the_form(tmp_path):
    from engine.settings_manager import DEFAULT_SETTINGS
    from ui.tab_batch import batch_job

    form = dict(DEFAULT_SETTINGS) | {"outscale": 2.0, "output_format": "webp", "quality": 70}
    job = batch_job(form, True, tmp_path)
    assert job.auto and dict(job.explicit) == {"outscale": 2.0, "output_format": "webp", "quality": 70}
    advice = Advice(settings=EnhanceSettings(model="RealESRGAN_x4plus_anime_6B", outscale=4.0), reasons=())
    merged = merge(advice, job.explicit, job.settings)
    assert (merged.model, merged.outscale, merged.output_format, merged.quality) == (
        "RealESRGAN_x4plus_anime_6B", 2.0, "webp", 70)
    fixed = batch_job(form, False, tmp_path)
    assert not fixed.auto and EnhanceSettings.from_mapping(fixed.explicit) == fixed.settings


def _cli(tmp_path: Path, weights_dir: Path, *args: str) -> subprocess.CompletedProcess:
    from tests.test_model_manager import _clean_env

    env = _clean_env(tmp_path) | {"REALESRGAN_WEIGHTS_DIR": str(weights_dir)}
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], capture_output=True, text=True,
                          timeout=900, env=env, cwd=tmp_path)


def test_enhance_auto_with_scale_2_gives_x2_and_keeps_tile_and_precision(tmp_path, model_manager_session):
    photo = np.asarray(Image.open(DATA / "advisor" / "00003.png").convert("RGB"))[:40, :48]
    Image.fromarray(photo).save(tmp_path / "photo.png")
    done = _cli(tmp_path, model_manager_session.weights_dir, "enhance", str(tmp_path / "photo.png"), "-o",
                str(tmp_path / "out.png"), "--auto", "--scale", "2", "--tile", "16", "--precision", "fp32", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["ok"] and record["advisor"]
    assert Image.open(tmp_path / "out.png").size == (96, 80)
    assert record["scale"] == 2.0 and record["tile"] == 16 and record["precision"] == "fp32"


# ------------------------------------------------------------------------------------------------ one tile
def test_the_tile_the_advisor_shows_is_the_tile_that_runs(config, model_manager):
    from engine.intelligent_enhancer import IntelligentEnhancer
    from engine.processor import enhance_image_direct

    config = config.replace(cpu_memory_reuse=False)
    rng = np.random.default_rng(3)
    image = (rng.random((420, 400, 3)) * 255).astype(np.uint8)
    advisor = IntelligentEnhancer(model_manager=model_manager, config=config, calibrate=False)
    advice = advisor.advise(image)
    assert advice.settings.tile == "auto"
    shown = advice.analysis["optimal_tile"]
    from engine.inference import planning
    from utils.gpu import resolve_device

    spec = model_manager.spec(FAST)
    engine_tile = planning.choose_tile(spec, 420, 400, device=resolve_device("cpu"), precision="fp32",
                                       batch_size=1, config=config).tile
    model_tile = planning.choose_tile(model_manager.spec(advice.settings.model), 420, 400,
                                      device=resolve_device("cpu"), precision="fp32", batch_size=1,
                                      config=config).tile
    assert shown == model_tile
    result = enhance_image_direct(image[:, :, :3], advice.settings.replace(model=FAST, outscale=1.0,
                                                                           quality_metrics=False),
                                  model_manager, config=config)
    assert result.tile == engine_tile


# ------------------------------------------------------------------------------------------------ code shape
def _engine_imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in (ROOT / "engine").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        imports = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("engine"):
                imports.add(node.module)
                imports.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                imports.update(a.name for a in node.names if a.name.startswith("engine"))
        graph[module] = imports
    return {m: {i for i in deps if i in graph and i != m} for m, deps in graph.items()}


def test_no_import_cycle_in_the_engine():
    graph = _engine_imports()
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, trail + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_functions_take_at_most_eight_parameters():
    too_many = []
    for folder in ("engine", "ui"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    args = node.args
                    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
                    names = [n for n in names if n not in ("self", "cls")]
                    argv_builder = path.name == "ffmpeg.py" and node.name.endswith("_argv") and args.kwonlyargs
                    if len(names) > 8 and not argv_builder:
                        too_many.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({len(names)})")
    assert too_many == []


def test_processor_stays_the_thin_public_entry():
    source = (ROOT / "engine" / "processor.py").read_text()
    assert len(source.splitlines()) < 300
    assert "def enhance_image_direct" in source and "def process_batch" in source
