"""The web UI without a server: the Blocks build, upload validation, zip safety, presets through the handlers,
the settings form conversions and the error messages users see."""

from __future__ import annotations

import json
import struct
import threading
import zipfile
import zlib
from pathlib import Path

import pytest

from engine.errors import InputTooLargeError, InvalidInputError, InvalidSettingsError, UnsupportedFormatError
from tests.conftest import app_config

DATA = Path(__file__).resolve().parent / "data"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height`` with only a few rows of data (a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress((b"\x00" + b"\x00" * 3 * min(width, 4096)) * 2, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@pytest.fixture
def services(config):
    from ui.services import create_services

    return create_services(config)


@pytest.fixture
def small_png(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "small.png"
    Image.open(DATA / "images" / "children_alpha_crop.png").convert("RGB").crop((0, 0, 40, 32)).save(path)
    return path


# ------------------------------------------------------------------------------------------------ the Blocks
def test_blocks_build_with_five_tabs_and_two_public_endpoints(services):
    import gradio as gr

    from ui.app import build_app

    demo = build_app(services)
    assert isinstance(demo, gr.Blocks)
    labels = [b.label for b in demo.blocks.values() if isinstance(b, gr.Tab)]
    assert labels == ["Image Enhancement", "Video", "Batch", "Presets", "System Info"]
    assert any(isinstance(b, gr.ImageSlider) for b in demo.blocks.values())
    endpoints = demo.get_api_info()["named_endpoints"]
    assert set(endpoints) == {"/enhance", "/analyze"}  # every UI-internal event is private
    params = endpoints["/enhance"]["parameters"]
    assert [p["parameter_has_default"] for p in params] == [False, True]  # only the image is required
    assert endpoints["/enhance"]["returns"][0]["component"] == "Image"  # the enhanced image comes first


def test_share_without_auth_is_refused(config):
    from ui.app import EXIT_USAGE, launch, share_refusal

    open_share = config.replace(share=True)
    assert "password" in share_refusal(open_share)
    assert launch(open_share) == EXIT_USAGE  # refused before anything is built or served
    assert share_refusal(open_share.replace(auth="me:secret")) is None
    assert share_refusal(open_share.replace(allow_share_without_auth=True)) is None


def test_launch_arguments_serve_only_the_apps_folders(config):
    from ui.app import launch_kwargs

    kwargs = launch_kwargs(config.replace(auth="me:secret", max_upload_mb=12, enable_video=False))
    assert kwargs["allowed_paths"] == [str(Path(config.output_dir).resolve()), str(Path(config.temp_dir).resolve())]
    assert str(Path(config.weights_dir).resolve()) in kwargs["blocked_paths"]
    assert kwargs["auth"] == ("me", "secret")
    assert kwargs["max_file_size"] == "12mb"


# ------------------------------------------------------------------------------------------------ uploads
def test_bomb_header_is_refused_without_decoding(tmp_path, config):
    from ui.uploads import check_image_upload

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(50000, 50000))
    with pytest.raises(InputTooLargeError, match=r"50000×50000.*limit"):
        check_image_upload(bomb, config)


def test_upload_allow_list_and_damaged_files(tmp_path, config, small_png):
    from ui.uploads import check_image_upload

    header = check_image_upload(small_png, config)
    assert (header.width, header.height, header.format) == (40, 32, "PNG")
    gif = tmp_path / "anim.png"  # the extension lies; the content decides
    gif.write_bytes(b"GIF89a" + b"\x01\x00\x01\x00" + b"\x00" * 20)
    with pytest.raises(UnsupportedFormatError):
        check_image_upload(gif, config)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(InvalidInputError):
        check_image_upload(empty, config)
    with pytest.raises(InputTooLargeError, match="MB"):
        check_image_upload(small_png, config.replace(max_upload_mb=0.0001))


def test_zip_extraction_is_safe_and_keeps_only_images(tmp_path, small_png):
    from ui.uploads import extract_images

    archive = tmp_path / "in.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(small_png, "../../escape.png")
        zf.write(small_png, "/abs/path.png")
        zf.write(small_png, "sub/dir/a.png")
        zf.writestr("notes.txt", "hello")
        zf.writestr(".hidden.png", "x")
        link = zipfile.ZipInfo("link.png")
        link.external_attr = 0o120777 << 16
        zf.writestr(link, "/etc/passwd")
    dest = tmp_path / "out"
    contents = extract_images(archive, dest, max_total_bytes=10 << 20)
    names = sorted(p.name for p in contents.images)
    assert names == ["abs_path.png", "escape.png", "sub_dir_a.png"]
    assert all(p.parent == dest for p in contents.images)
    assert not (tmp_path / "escape.png").exists()
    assert any("notes.txt" in s for s in contents.skipped) and any("link" in s for s in contents.skipped)


def test_zip_bomb_is_stopped(tmp_path):
    from ui.uploads import extract_images

    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.png", b"\0" * (3 << 20))
    with pytest.raises(InputTooLargeError):
        extract_images(archive, tmp_path / "out", max_total_bytes=1 << 20)
    not_zip = tmp_path / "fake.zip"
    not_zip.write_bytes(b"not a zip")
    with pytest.raises(InvalidInputError):
        extract_images(not_zip, tmp_path / "out2", max_total_bytes=1 << 20)


def test_temp_job_dir_is_removed(config):
    from ui.uploads import temp_job_dir

    with temp_job_dir(config) as folder:
        (folder / "x").write_text("scratch")
        assert folder.is_dir()
    assert not folder.exists()


# ------------------------------------------------------------------------------------------------ settings form
def test_form_round_trip_and_validation():
    from engine.settings_manager import DEFAULT_SETTINGS
    from ui.form import FORM_KEYS, settings_to_widget_values, to_enhance_settings, widget_values_to_settings

    settings = dict(DEFAULT_SETTINGS) | {"model": "realesr-animevideov3-x2", "outscale": 2.0, "tile": 256,
                                         "face_enhance": True, "output_format": "webp", "quality": 80}
    values = settings_to_widget_values(settings)
    assert len(values) == len(FORM_KEYS)
    assert widget_values_to_settings(values) == settings
    engine = to_enhance_settings(settings)
    assert (engine.model, engine.outscale, engine.tile, engine.output_format) == ("realesr-animevideov3-x2", 2.0,
                                                                                 256, "webp")
    bad = list(values)
    bad[FORM_KEYS.index("outscale")] = 20
    with pytest.raises(InvalidSettingsError, match="outscale"):
        widget_values_to_settings(bad)


def test_video_tab_widget_values_become_the_settings_objects():
    pytest.importorskip("engine.video")
    from engine.settings import EnhanceSettings
    from engine.video import VideoSettings
    from ui.tab_video import SETTINGS_KEYS, VideoTab, settings_from_widgets

    values = {"model": "realesr-animevideov3", "outscale": 2, "face_enhance": False, "codec": "vp9",
              "crf": 30.0, "preset": "fast", "batch_frames": 8.0}  # JSON numbers as the sliders send them
    settings, video = settings_from_widgets([values[key] for key in SETTINGS_KEYS])
    assert settings == EnhanceSettings(model="realesr-animevideov3", outscale=2.0, face_enhance=False)
    assert video == VideoSettings(codec="vp9", crf=30, preset="fast", batch_frames=8)
    assert VideoTab(**{key: key for key in SETTINGS_KEYS}).settings_widgets == list(SETTINGS_KEYS)
    for key, bad in (("outscale", 20), ("crf", 99), ("batch_frames", 2.5), ("model", "no-such-model")):
        with pytest.raises(InvalidSettingsError, match=key):
            settings_from_widgets([bad if k == key else values[k] for k in SETTINGS_KEYS])


def test_api_settings_only_keep_what_was_given():
    from ui.tab_image import api_settings

    assert api_settings(None) == {} and api_settings({}) == {}
    assert api_settings('{"model": "realesr-animevideov3-x2", "outscale": 2}') == {
        "model": "realesr-animevideov3-x2", "outscale": 2.0}
    with pytest.raises(InvalidSettingsError):
        api_settings("[1, 2]")
    with pytest.raises(InvalidSettingsError):
        api_settings({"quality": 1000})


def test_recommendation_is_applied_to_the_form():
    from engine.settings_manager import DEFAULT_SETTINGS
    from ui.form import settings_from_recommendation

    from engine.settings import Advice, EnhanceSettings

    advised = Advice(settings=EnhanceSettings(model="RealESRGAN_x4plus_anime_6B", outscale=2, denoise_strength=0.3,
                                              precision="fp32"), reasons=("anime",))
    current = dict(DEFAULT_SETTINGS) | {"tile": 256, "quality": 70, "face_strength": 0.4}
    updated = settings_from_recommendation(advised, current)
    assert (updated["model"], updated["outscale"], updated["precision"], updated["tile"]) == (
        "RealESRGAN_x4plus_anime_6B", 2.0, "fp32", "auto")
    assert (updated["quality"], updated["face_strength"]) == (70, 0.4)  # the user's other settings stay


# ------------------------------------------------------------------------------------------------ presets
def test_presets_round_trip_through_the_handlers(services, tmp_path):
    from engine.settings_manager import BuiltinPresetError, DEFAULT_SETTINGS, SettingsManager
    from ui import tab_presets
    from ui.form import FORM_KEYS, settings_to_widget_values

    manager = services.settings
    values = settings_to_widget_values(dict(DEFAULT_SETTINGS) | {"model": "RealESRGAN_x4plus_anime_6B",
                                                                 "outscale": 3.0, "denoise_strength": 0.2})
    assert tab_presets.save_preset(manager, "  My scans ", values) == "My scans"
    names = [value for _label, value in tab_presets.preset_choices(manager)]
    assert "My scans" in names and "Photo quality" in names
    loaded = tab_presets.load_preset(manager, "My scans")
    assert loaded == values

    exported = tab_presets.export_presets(manager, services.config)
    assert json.loads(exported.read_text())["presets"]["My scans"]["outscale"] == 3.0
    tab_presets.delete_preset(manager, "My scans")
    assert "My scans" not in dict((v, v) for _l, v in tab_presets.preset_choices(manager))
    assert tab_presets.import_presets(manager, exported) == ["My scans"]

    # A fresh manager on the same folder (an app restart) sees the imported preset again.
    again = SettingsManager(services.config.config_dir)
    assert tab_presets.load_preset(again, "My scans")[FORM_KEYS.index("model")] == "RealESRGAN_x4plus_anime_6B"
    with pytest.raises(BuiltinPresetError):
        tab_presets.delete_preset(manager, "Photo quality")


def test_last_used_settings_come_back_after_restart(services):
    from engine.settings_manager import SettingsManager
    from ui.app import _initial_settings

    services.settings.save_settings({"model": "realesr-animevideov3-x2", "outscale": 2.0})
    restarted = type(services)(**{**services.__dict__, "settings": SettingsManager(services.config.config_dir)})
    assert _initial_settings(restarted)["model"] == "realesr-animevideov3-x2"


# ------------------------------------------------------------------------------------------------ messages
def test_error_messages_hide_paths_and_tracebacks():
    from utils.errors import scrub_paths, user_message

    assert scrub_paths("file not found: /srv/app/gradio/abc/photo.png") == "file not found: photo.png"
    assert "C:" not in scrub_paths(r"cannot write C:\Users\me\out\x.png")
    assert scrub_paths("scale 1/2 from https://example.org/a/b.pth") == "scale 1/2 from https://example.org/a/b.pth"
    message = user_message(InvalidInputError("Cannot decode /home/me/secret/x.png."))
    assert "/home" not in message and "x.png" in message
    generic = user_message(KeyError("internal detail"))
    assert "internal detail" not in generic and "KeyError" not in generic and "log" in generic


# ------------------------------------------------------------------------------------------------ batch
def test_batch_reports_successes_failures_and_zips_the_results(services, tmp_path, small_png):
    from ui.tab_batch import enhance_uploads
    from ui.form import settings_to_widget_values, widget_values_to_settings

    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(small_png, "inner/one.png")
        zf.writestr("readme.txt", "not an image")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(50000, 50000))
    settings = widget_values_to_settings(settings_to_widget_values({"model": "realesr-animevideov3-x2",
                                                                    "outscale": 2.0}))
    seen = []
    outcome = enhance_uploads(services, [(small_png, "small.png"), (archive, "more.zip"), (bomb, "bomb.png")],
                              settings, False, progress=lambda i, n, name, f: seen.append((i, n)))
    assert outcome.summary.startswith("**2 successful, 2 failed**")
    reasons = dict(outcome.failures)
    assert "too large" in reasons["bomb.png"] and "not an image" in reasons["more.zip"]
    assert sorted(p.name for p, _ in outcome.outputs) == ["inner_one.png", "small.png"]
    with zipfile.ZipFile(outcome.archive) as zf:
        assert sorted(zf.namelist()) == ["inner_one.png", "small.png"]
    assert seen and seen[-1] == (2, 2)
    assert not any(Path(services.config.temp_dir).iterdir()), "the batch's scratch folder is removed"


def test_cancel_stops_an_image_job_with_a_readable_message(services, small_png):
    import threading

    from engine.errors import CancelledError
    from utils.errors import user_message
    from ui.jobs import CancelToken
    from ui.tab_image import enhance_file

    token = CancelToken()
    event = token.start()
    token.cancel()
    with pytest.raises(CancelledError) as stopped:
        enhance_file(services, small_png, {"model": "realesr-animevideov3-x2"}, cancel=event)
    assert "Cancel" in user_message(stopped.value)
    assert isinstance(event, threading.Event) and token.start() is not event  # each job gets a fresh flag


def test_an_image_job_teaches_the_advisors_time_estimates(services, small_png):
    from engine.advisor.estimates import device_kind, job_key, store_for
    from ui.tab_image import enhance_file

    def key(report: dict) -> str:
        return job_key(device_kind(report["device"]), report["model"], report["precision"], bool(report["tile"]))

    store = store_for(services.config)
    first = enhance_file(services, small_png, {"model": "realesr-animevideov3-x2"}).report
    seen = store.observations(key(first))
    assert seen and seen[-1].output_pixels == first["output_size"][0] * first["output_size"][1]
    second = enhance_file(services, small_png, {"model": "realesr-animevideov3-x2"}).report
    assert key(second) == key(first) and store.observations(key(first)) != seen  # one more run learned
    assert store.observations(key(first))[-1].network_seconds > 0


def test_web_jobs_estimated_over_the_time_limit_are_refused_before_they_run(tmp_path, shared_weights_dir,
                                                                             small_png):
    from engine.intelligent_enhancer import ThroughputCalibrator
    from ui.services import create_services
    from engine.catalog import CATALOG
    from ui.tab_batch import enhance_uploads
    from ui.tab_image import advice_markdown, analyze_file, enhance_file

    config = app_config(tmp_path, shared_weights_dir, device="cpu", job_time_limit_seconds=5)
    config.ensure_directories()
    calibration = config.config_dir / "calibration.json"  # a slow machine on record: 1 kMAC/s for every model
    calibration.write_text(json.dumps({ThroughputCalibrator(calibration).key(name, "cpu"): 1e3
                                       for name, spec in CATALOG.items() if spec.kind == "sr"}))
    services = create_services(config)
    advice = analyze_file(services, small_png)  # the advisor says so before Enhance is pressed
    assert advice["time_limit"].startswith("Enhance would be refused. This 40×32 image with "), advice["time_limit"]
    assert "**Time limit:** Enhance would be refused." in advice_markdown(advice)
    with pytest.raises(InputTooLargeError, match="40×32 image with realesr-animevideov3-x2 would take about"):
        enhance_file(services, small_png, {"model": "realesr-animevideov3-x2"})
    outcome = enhance_uploads(services, [(small_png, "small.png")], {"model": "realesr-animevideov3-x2"}, False)
    assert outcome.outputs == () and "limit of 5 s per job" in outcome.failures[0][1], outcome.failures  # a batch too
    assert services.model_manager.loaded_models() == []  # refused before its network was loaded
    assert not any((tmp_path / "out").rglob("*_enhanced.*"))


def test_the_warm_up_measures_the_device_so_the_first_request_is_checked_against_the_time_limit(tmp_path,
                                                                                                  shared_weights_dir):
    from engine.intelligent_enhancer import ThroughputCalibrator
    from ui.app import start_warm_up
    from ui.services import create_services

    config = app_config(tmp_path, shared_weights_dir, device="cpu", job_time_limit_seconds=60)
    config.ensure_directories()
    services = create_services(config)
    advisor = services.advisor
    advisor.calibrator = ThroughputCalibrator(config.config_dir / "calibration.json", size=32,  # small: quick
                                              busy_share=0)  # kept if busy
    assert advisor.calibrator.device_rates("cpu") == []  # a fresh machine: nothing measured
    start_warm_up(services).join(timeout=300)
    measured = advisor.calibrator.device_rates("cpu")
    assert advisor.calibrator.cached(advisor.fastest_model(), "cpu") in measured
    advisor.check_auto_time_limit(16, 16, 60)  # a figure now: small images pass, large ones are refused
    with pytest.raises(InputTooLargeError, match="the quickest model the advisor would choose"):
        advisor.check_auto_time_limit(6000, 6000, 60)
    start_warm_up(services).join(timeout=300)  # a second launch measures nothing more
    assert advisor.calibrator.device_rates("cpu") == measured


def _warm_up_services(tmp_path, shared_weights_dir):
    """The app's services on a fresh config whose settings name the small model, with a small calibrator kept
    whatever the load (quick); returns (services, calibrator)."""
    from engine.intelligent_enhancer import ThroughputCalibrator
    from engine.settings_manager import DEFAULT_SETTINGS
    from ui.services import create_services

    config = app_config(tmp_path, shared_weights_dir, device="cpu")
    config.ensure_directories()
    services = create_services(config)
    services.settings.save_settings({**DEFAULT_SETTINGS, "model": "realesr-animevideov3"})
    services.advisor.calibrator = ThroughputCalibrator(config.config_dir / "calibration.json", size=32, busy_share=0)
    return services, services.advisor.calibrator


def test_the_warm_up_leaves_its_calibrations_until_no_job_runs(tmp_path, shared_weights_dir, monkeypatch):
    """A request that arrives while the app warms up gets the cores: the face detector's set-up and the advised
    models' calibrations (work for later requests) wait while a job holds the device, then run."""
    from engine import face_detect
    from engine.intelligent_enhancer import ADVISED_MODELS
    from ui.app import WARM_UP_SETTLE_SECONDS, start_warm_up

    services, calibrator = _warm_up_services(tmp_path, shared_weights_dir)
    monkeypatch.setattr(face_detect, "_free_cascades", [])
    reached = threading.Event()
    wait_idle = services.limiter.wait_idle

    settles = []

    def observed(timeout=None, settle=0.0):
        settles.append(settle)
        reached.set()
        return wait_idle(timeout, settle)

    monkeypatch.setattr(services.limiter, "wait_idle", observed)
    with services.limiter.slot():  # a job runs
        thread = start_warm_up(services)
        assert reached.wait(timeout=300)  # the model is warm; what serves later requests waits
        assert thread.is_alive() and face_detect._free_cascades == []
        assert calibrator.cached("RealESRGAN_x4plus", "cpu") is None
    thread.join(timeout=300)
    assert not thread.is_alive() and face_detect._free_cascades
    assert all(calibrator.cached(model, "cpu") for model in ADVISED_MODELS)
    assert set(settles) == {WARM_UP_SETTLE_SECONDS}  # and not in the moment between two requests


def test_a_warm_up_calibration_that_a_job_shared_is_not_kept(tmp_path, shared_weights_dir, monkeypatch):
    """A job that starts during a background calibration shares the cores with it (in one process, so the load
    check cannot see it): that figure is not kept, and it is measured again once the device is quiet."""
    from engine.intelligent_enhancer import ADVISED_MODELS, rate_class, rate_siblings
    from ui.app import start_warm_up

    services, calibrator = _warm_up_services(tmp_path, shared_weights_dir)
    spoiled = rate_siblings("RealESRGAN_x4plus")[0]  # the network timed for the RRDBNets
    measured = []
    measure = calibrator._measure

    def a_job_starts_during_the_first(model, device, network=None):
        if model == spoiled and spoiled not in measured:
            services.limiter.try_acquire().release()  # a short job, started and ended during the timed run
        measured.append(model)
        return measure(model, device, network)

    monkeypatch.setattr(calibrator, "_measure", a_job_starts_during_the_first)
    start_warm_up(services).join(timeout=300)
    assert measured.count(spoiled) == 2  # not kept, so measured again once the device was quiet
    assert all(calibrator.cached(m, "cpu") for m in ADVISED_MODELS)
    assert all(measured.count(m) == 1 for m in measured if rate_class(m) != rate_class(spoiled))


def test_the_warm_up_prepares_the_first_analyze_whatever_model_the_settings_name(tmp_path, shared_weights_dir,
                                                                                   monkeypatch, small_png):
    """Settings naming a model run no advice in the model's warm-up: the face detector is set up and the advised
    models calibrated all the same, so the first Analyze after an install waits for neither (~0.5 s for
    scikit-image's imports and the cascades, ~15 s of calibrations on a 2-core CPU)."""
    from engine import face_detect
    from engine.intelligent_enhancer import ADVISED_MODELS
    from ui.app import start_warm_up
    from ui.tab_image import analyze_file

    services, calibrator = _warm_up_services(tmp_path, shared_weights_dir)
    monkeypatch.setattr(face_detect, "_free_cascades", [])  # none loaded yet, as in a fresh process
    start_warm_up(services).join(timeout=300)
    assert services.model_manager.loaded_models() == ["realesr-animevideov3@cpu/fp32"]  # the named model, no advice
    assert len(face_detect._free_cascades) >= face_detect._scan_threads()
    assert all(calibrator.cached(model, "cpu") for model in ADVISED_MODELS)
    measured = calibrator.device_rates("cpu")
    monkeypatch.setattr(calibrator, "_measure", lambda *a, **k: pytest.fail("the first Analyze calibrated"))
    assert analyze_file(services, small_png)["settings"]["model"]  # advice, with nothing left to measure
    assert calibrator.device_rates("cpu") == measured


def test_on_a_cpu_with_native_bf16_the_warm_up_checks_bf16_so_the_first_bf16_request_does_not(
        tmp_path, shared_weights_dir, monkeypatch):
    """Where the advice offers bf16 as the fast mode (native bf16 on the CPU; said so here, whatever this CPU), the
    warm-up measures the warmed-up model's bf16 verdict and keeps it on disk; the first bf16 request finds it and
    probes nothing, and the bf16 copy the check loaded is not left in memory."""
    from engine.inference import precision_check
    from engine.settings import EnhanceSettings
    from ui.app import start_warm_up
    from utils import gpu

    services, _ = _warm_up_services(tmp_path, shared_weights_dir)
    verdicts = tmp_path / "verdicts.json"
    monkeypatch.setattr(precision_check, "verdicts_path", lambda manager: verdicts)  # not the shared weights dir
    monkeypatch.setattr(precision_check, "_bf16_verdicts", {})  # nor this process's earlier verdicts
    monkeypatch.setattr(gpu, "cpu_has_fast_bf16", lambda: True)
    probes = precision_check.probe_runs
    start_warm_up(services).join(timeout=300)
    assert precision_check.probe_runs == probes + 1
    key = precision_check.verdict_key("realesr-animevideov3", EnhanceSettings().denoise_strength)
    assert precision_check.read_verdicts(verdicts)[key] >= precision_check.BF16_MIN_PSNR
    assert services.model_manager.loaded_models() == ["realesr-animevideov3@cpu/fp32"]
    monkeypatch.setattr(precision_check, "_bf16_verdicts", {})  # a new process: the verdict comes from the disk
    precision_check.bf16_psnr(services.model_manager, "realesr-animevideov3", EnhanceSettings().denoise_strength)
    assert precision_check.probe_runs == probes + 1
    monkeypatch.setattr(gpu, "cpu_has_fast_bf16", lambda: False)  # elsewhere bf16 is not offered: nothing checked
    assert precision_check.check_loaded_models(services.model_manager, 0.5) == []


def test_presets_overview_lists_builtins_and_user_presets(tmp_path):
    from engine.settings_manager import BUILTIN_PRESETS, SettingsManager
    from ui.tab_presets import presets_overview

    manager = SettingsManager(tmp_path)
    manager.save_preset("My scans", {"model": "RealESRGAN_x4plus", "outscale": 2.0})
    table = presets_overview(manager)
    assert "| My scans | yours | RealESRGAN_x4plus | ×2.0 | off |" in table
    for name in BUILTIN_PRESETS:
        assert f"| {name} | built-in |" in table


def test_result_table_shows_the_quality_metrics_that_were_computed(services, small_png):
    from ui.tab_image import enhance_file, metric_rows

    outcome = enhance_file(services, small_png, {"model": "realesr-animevideov3-x2"})
    assert "| Fidelity to the input | PSNR " in outcome.summary
    assert "LPIPS" not in outcome.summary  # no AlexNet trunk here: null, so no row (the reason is in the metrics)
    rows = dict(metric_rows({"lr_psnr": 38.25, "lr_ssim": 0.9712, "niqe_input": 6.5, "niqe_output": 4.25,
                             "lpips": 0.1234, "identity_similarity": 0.812, "warnings": []}))
    assert rows == {"Fidelity to the input": "PSNR 38.2 dB, SSIM 0.971 (output shrunk back)",
                    "NIQE (lower is better)": "6.50 → 4.25", "LPIPS to the input (lower is closer)": "0.123",
                    "Face identity kept (1 = same)": "0.81"}
    assert metric_rows({"lr_psnr": None, "lpips": None, "identity_similarity": True}) == []


def test_system_tab_lists_every_catalog_model_with_where_it_comes_from(services):
    from engine.catalog import CATALOG
    from ui.tab_system import downloadable, model_rows

    rows = {r[0]: r for r in model_rows(services)}
    assert set(rows) == set(CATALOG)
    assert rows["lpips-alex-v0.1"][3] == "Ready (installed package)" and rows["lpips-alex-v0.1"][1] == "metric"
    assert rows["arcface-ir-se50"][3] == "Not downloaded"
    assert {"arcface-ir-se50", "lpips-alexnet", "GFPGANv1.4"} <= set(downloadable(services))
    assert "lpips-alex-v0.1" not in downloadable(services)
