"""The user's own models: tiny random-weight networks of five architectures, built with spandrel's own classes and
saved as ``.pth`` and ``.safetensors``, are imported through the CLI and the REST API (upload and a URL on a
loopback server), run through the real engine like the official models (output size and channels; tiled equals
untiled), appear among the model choices, and are removed; a code-running pickle, an unknown architecture and a
hash mismatch are refused with messages that say why. No network.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import ChecksumMismatchError, InvalidInputError, InvalidSettingsError
from tests.conftest import serve_folder
from tests.test_model_manager import _Evil


@pytest.fixture(scope="module", autouse=True)
def _no_user_catalog_afterwards():
    """The model managers here make their weights dir's catalog the process's choices; other modules start clean."""
    from engine.catalog import use_user_catalog

    yield
    use_user_catalog(None)


def _networks() -> dict[str, tuple[torch.nn.Module, str, int]]:
    """name -> (tiny network, spandrel architecture id, scale)."""
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.ESRGAN import ESRGAN
    from spandrel.architectures.SPAN import SPAN
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(0)
    return {
        "tiny-rrdb": (ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4), "ESRGAN", 4),
        "tiny-compact": (Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=3), "Compact", 3),
        "tiny-swinir": (SwinIR(img_size=16, in_chans=3, embed_dim=12, depths=[2], num_heads=[2], window_size=8,
                               mlp_ratio=2.0, upscale=2, upsampler="pixelshuffledirect"), "SwinIR", 2),
        "tiny-span": (SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2), "SPAN", 2),
        "tiny-dejpeg-1x": (ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=1, shuffle_factor=4),
                           "ESRGAN", 1),
        "tiny-gray": (Compact(num_in_ch=1, num_out_ch=1, num_feat=8, num_conv=2, upscale=2), "Compact", 2),
    }


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, Path]:
    """Each network saved twice: a torch ``.pth`` (wrapped in ``params_ema``, as BasicSR saves) and ``.safetensors``."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("custom-models")
    files = {}
    for name, (net, _arch, _scale) in _networks().items():
        state = {k: v.contiguous() for k, v in net.state_dict().items()}
        torch.save({"params_ema": state}, folder / f"{name}.pth")
        save_file(state, folder / f"{name}.safetensors")
        files[name] = folder / f"{name}.pth"
        files[name + "-st"] = folder / f"{name}.safetensors"
    return files


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory, model_files) -> Path:
    """A weights dir where every model was imported through the CLI (the .safetensors file for half of them)."""
    import main

    folder = tmp_path_factory.mktemp("custom-weights")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REALESRGAN_WEIGHTS_DIR", str(folder))
        patch.setenv("REALESRGAN_CONFIG_DIR", str(folder.parent / "cfg"))
        patch.setenv("REALESRGAN_LOG_DIR", str(folder.parent / "logs"))
        for index, name in enumerate(_networks()):
            source = model_files[name + "-st"] if index % 2 else model_files[name]
            kind = "anime" if "compact" in name else "photo"
            assert main.main(["models", "add", str(source), "--name", name, "--kind", kind]) == 0
    return folder


def _manager(weights_dir: Path):
    from config import Config
    from engine.model_manager import ModelManager

    return ModelManager(Config.from_env(env={}, dotenv_path=None, weights_dir=weights_dir, download_retries=0,
                                        device="cpu"))


def _image(width: int, height: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, channels)).astype(np.uint8)
    import cv2

    image = cv2.resize(smooth, (width, height), interpolation=cv2.INTER_CUBIC)
    return image.reshape(height, width, channels) if channels == 1 else image


def _advisor_image(name: str, width: int, height: int) -> np.ndarray:
    """tests/data/advisor/``name`` as RGB, resized to width x height."""
    import cv2
    from PIL import Image

    image = np.asarray(Image.open(Path(__file__).resolve().parent / "data" / "advisor" / name).convert("RGB"))
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def _unsure_comic() -> np.ndarray:
    """A small crop of Real-ESRGAN's comic: a drawing the classifier is unsure about."""
    return _advisor_image("comic_lq.png", 80, 120)


# ------------------------------------------------------------------------------------------------ import, detect
def test_the_cli_import_detects_architecture_scale_and_channels(weights_dir, model_files):
    from engine.models.user_catalog import UserCatalog

    entries = UserCatalog(weights_dir).entries()
    assert list(entries) == list(_networks())
    for name, (_net, arch, scale) in _networks().items():
        entry = entries[name]
        source = model_files[name + "-st"] if list(_networks()).index(name) % 2 else model_files[name]
        assert (entry.architecture, entry.scale) == (arch, scale)
        assert entry.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
        assert entry.size_bytes == source.stat().st_size
        stored = weights_dir / entry.filename
        assert stored.read_bytes() == source.read_bytes() and stored.suffix == source.suffix
        assert entry.macs_per_pixel > 0 and entry.added
        assert (entry.overlap is None) == (arch in ("ESRGAN", "Compact"))  # those have the engine's own rule
        assert entry.overlap is None or 4 <= entry.overlap <= 64
    assert (entries["tiny-gray"].input_channels, entries["tiny-gray"].output_channels) == (1, 1)
    assert entries["tiny-swinir"].size_multiple == 8 and not entries["tiny-swinir"].supports_half
    assert entries["tiny-compact"].kind == "anime" and entries["tiny-rrdb"].kind == "photo"
    assert not list((weights_dir / "custom").glob(".incoming-*"))  # nothing half-imported is left behind


def test_models_list_shows_both_catalogs(weights_dir, monkeypatch, capsys):
    import main

    monkeypatch.setenv("REALESRGAN_WEIGHTS_DIR", str(weights_dir))
    assert main.main(["models", "list", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["RealESRGAN_x4plus"]["tag"] is None
    assert rows["tiny-span"]["tag"] == "photo" and rows["tiny-span"]["available"]
    assert rows["tiny-compact"]["scale"] == 3


def test_imported_models_are_model_choices_everywhere(weights_dir):
    from engine.settings import EnhanceSettings, sr_model_choices, sr_model_labels
    from main import build_parser

    _manager(weights_dir)  # the app's model manager makes its weights dir's user catalog the active one
    assert set(_networks()) <= set(sr_model_choices())
    assert EnhanceSettings(model="tiny-swinir").model == "tiny-swinir"
    assert sr_model_labels()["tiny-compact"].startswith("tiny-compact (×3) — your anime model (Compact")
    args = build_parser().parse_args(["enhance", "x.png", "-o", "y.png", "--model", "tiny-span"])
    assert args.model == "tiny-span"
    from ui.form import choices_for, sr_model_options

    for choices in (choices_for("model"), sr_model_options()):
        assert {"tiny-gray", "RealESRGAN_x4plus"} <= {value for _label, value in choices}


# ------------------------------------------------------------------------------------------------ the engine
@pytest.mark.parametrize("name", list(_networks()))
def test_each_model_enhances_with_the_right_size_and_tiles_match(weights_dir, name):
    from engine.processor import enhance_image_direct
    from engine.settings import EnhanceSettings

    manager = _manager(weights_dir)
    spec = manager.spec(name)
    channels = 1 if name == "tiny-gray" else 4 if name == "tiny-compact" else 3  # gray and RGBA inputs too
    image = _image(40, 36, channels)
    settings = EnhanceSettings(model=name, device="cpu", precision="fp32", quality_metrics=False, tile=0)
    whole = enhance_image_direct(image, settings, manager, config=manager.config)
    assert whole.pixels.shape == (36 * spec.scale, 40 * spec.scale, channels)
    assert whole.model == name
    tiled = enhance_image_direct(image, settings.replace(tile=16), manager, config=manager.config)
    assert tiled.tile == 16
    difference = np.abs(tiled.pixels.astype(int) - whole.pixels.astype(int))
    assert difference.mean() < 0.5 and np.percentile(difference, 99) <= 2, (name, difference.max())


def test_the_overlap_comes_from_the_measured_receptive_field(weights_dir):
    from engine.inference.planning import overlap_for

    manager = _manager(weights_dir)
    swinir, span = manager.spec("tiny-swinir"), manager.spec("tiny-span")
    assert overlap_for(swinir, 256) == swinir.overlap and overlap_for(span, 256) == span.overlap
    assert overlap_for(span, 8) == min(span.overlap, 8)
    assert swinir.pad_multiple == 8 and manager.spec("tiny-dejpeg-1x").pad_multiple == 4
    assert manager.spec("tiny-rrdb").arch == "RRDBNet"  # the official RRDBNet rules apply to an ESRGAN import


# ------------------------------------------------------------------------------------------------ refusals
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    from engine.models.user_catalog import UserCatalog

    marker = tmp_path / "pwned"
    for path in (tmp_path / "evil.pth", tmp_path / "legacy.ckpt"):
        if path.suffix == ".pth":
            torch.save({"params_ema": {"body.0.weight": _Evil(marker)}}, path)
        else:
            path.write_bytes(pickle.dumps({"params": _Evil(marker)}))
        with pytest.raises(InvalidInputError, match="would run code when loaded"):
            UserCatalog(tmp_path / "w").import_model(str(path))
    assert not marker.exists()
    assert UserCatalog(tmp_path / "w").entries() == {}
    assert not list((tmp_path / "w" / "custom").iterdir())


def test_an_unknown_architecture_is_refused(tmp_path):
    from engine.models.user_catalog import UserCatalog

    path = tmp_path / "mystery.safetensors"
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(4, 3), "decoder.bias": torch.zeros(4)}, path)
    with pytest.raises(InvalidInputError, match="Unknown architecture.*2 tensors"):
        UserCatalog(tmp_path / "w").import_model(str(path))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InvalidInputError, match="not a weights file"):
        UserCatalog(tmp_path / "w").import_model(str(tmp_path / "notes.txt"))


def test_a_hash_mismatch_and_a_taken_name_are_refused(tmp_path, model_files):
    from engine.models.user_catalog import UserCatalog

    catalog = UserCatalog(tmp_path / "w")
    source = model_files["tiny-span"]
    with pytest.raises(ChecksumMismatchError, match="expected sha256 " + "0" * 64):
        catalog.import_model(str(source), sha256="0" * 64)
    right = hashlib.sha256(source.read_bytes()).hexdigest()
    assert catalog.import_model(str(source), sha256=right.upper()).name == "tiny-span"
    with pytest.raises(InvalidSettingsError, match="already imported"):
        catalog.import_model(str(source))
    with pytest.raises(InvalidSettingsError, match="app's own models"):
        catalog.import_model(str(source), name="RealESRGAN_x4plus")
    # A file changed after import is refused when it loads: the hash pinned at import is checked.
    stored = tmp_path / "w" / catalog.entries()["tiny-span"].filename
    stored.write_bytes(stored.read_bytes() + b"\0")
    from engine.errors import ModelNotAvailableError

    with pytest.raises(ModelNotAvailableError, match="tiny-span.*changed since the import"):
        _manager(tmp_path / "w").load_model("tiny-span", "cpu", "fp32")


def test_remove_takes_the_entry_and_the_file(tmp_path, model_files, monkeypatch, capsys):
    import main

    monkeypatch.setenv("REALESRGAN_WEIGHTS_DIR", str(tmp_path / "w"))
    assert main.main(["models", "add", str(model_files["tiny-compact-st"]), "--name", "mine", "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert (tmp_path / "w" / entry["filename"]).is_file()
    assert main.main(["models", "remove", "mine"]) == 0
    assert not (tmp_path / "w" / entry["filename"]).exists()
    assert json.loads((tmp_path / "w" / "user_models.json").read_text())["models"] == []
    assert main.main(["models", "remove", "mine"]) != 0
    assert "No imported model is called 'mine'" in capsys.readouterr().err


def test_a_damaged_catalog_file_is_ignored_for_reading_and_refuses_writes(tmp_path, model_files):
    from engine.models.user_catalog import UserCatalog

    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "user_models.json").write_text("{not json")
    catalog = UserCatalog(folder)
    assert catalog.entries() == {}
    with pytest.raises(InvalidInputError, match="is damaged"):
        catalog.import_model(str(model_files["tiny-span"]))
    assert (folder / "user_models.json").read_text() == "{not json"  # left for the user to look at


# ------------------------------------------------------------------------------------------------ REST
def test_the_rest_api_imports_by_upload_and_url_enhances_and_removes(tmp_path, model_files, face_files):
    import base64
    import io

    import httpx
    from PIL import Image

    from tests.test_rest_api import _services, serve

    from config import Config

    config = Config.from_env(env={}, dotenv_path=None, weights_dir=tmp_path / "w", temp_dir=tmp_path / "tmp",
                             output_dir=tmp_path / "out", config_dir=tmp_path / "cfg", log_dir=tmp_path / "logs",
                             download_retries=0, download_timeout=5.0, device="cpu")
    manager = _manager(tmp_path / "w")
    with serve(_services(config, manager)) as url, serve_folder(model_files["tiny-span"].parent) as files, \
            httpx.Client(base_url=url, timeout=120) as client:
        upload = model_files["tiny-swinir-st"]
        response = client.post("/api/v1/models/import", files={"file": (upload.name, upload.read_bytes())},
                               data={"kind": "text"})
        assert response.status_code == 200, response.text
        assert response.json()["model"]["architecture"] == "SwinIR"
        assert response.json()["model"]["name"] == "tiny-swinir"
        digest = hashlib.sha256(model_files["tiny-span"].read_bytes()).hexdigest()
        response = client.post("/api/v1/models/import", data={"url": f"{files}/tiny-span.pth", "sha256": digest,
                                                               "name": "span-from-url"})
        assert response.status_code == 200, response.text
        assert response.json()["model"]["source"].endswith("/tiny-span.pth")
        refused = client.post("/api/v1/models/import", data={"url": f"{files}/tiny-span.pth", "sha256": "1" * 64,
                                                             "name": "span-bad"})
        assert refused.status_code == 503 and "Checksum mismatch" in refused.json()["error"]
        assert [p.name for p in (tmp_path / "w" / "custom").iterdir() if p.name.startswith(".")] == []
        unknown = client.post("/api/v1/models/import", files={"file": ("x.pth", _mystery_bytes())})
        assert unknown.status_code == 422 and "Unknown architecture" in unknown.json()["error"]
        assert str(tmp_path) not in unknown.text

        face = face_files["gfpgan"]
        response = client.post("/api/v1/models/import", files={"file": (face.name, face.read_bytes())})
        assert response.status_code == 200 and response.json()["model"]["kind"] == "face", response.text

        listed = {m["name"]: m for m in client.get("/api/v1/models").json()["models"]}
        assert listed["tiny-swinir"]["tag"] == "text" and listed["span-from-url"]["scale"] == 2
        assert (listed["tiny-gfpgan"]["kind"], listed["tiny-gfpgan"]["tag"]) == ("face", "face")

        buffer = io.BytesIO()
        Image.fromarray(_image(24, 20)).save(buffer, format="PNG")
        response = client.post("/api/v1/enhance", files={"file": ("in.png", buffer.getvalue(), "image/png")},
                               data={"model": "span-from-url"})
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert (data["width"], data["height"]) == (48, 40) and data["settings"]["model"] == "span-from-url"
        assert Image.open(io.BytesIO(base64.b64decode(data["restored_image"]))).size == (48, 40)

        assert client.delete("/api/v1/models/span-from-url").status_code == 200
        assert "span-from-url" not in {m["name"] for m in client.get("/api/v1/models").json()["models"]}
        assert client.delete("/api/v1/models/RealESRGAN_x4plus").status_code == 422


def _mystery_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"encoder.weight": torch.zeros(2, 2)}, buffer)
    return buffer.getvalue()


def test_the_advisor_offers_the_users_models_of_the_images_kind(weights_dir):
    from engine.intelligent_enhancer import AnalysisNumbers, MachineFacts, decide

    manager = _manager(weights_dir)
    available = frozenset(s.name for s in manager.list_models() if s.available)
    machine = MachineFacts(device="cpu", free_memory_bytes=16 * 2**30, available_models=available,
                           downloadable_models=frozenset(), macs_per_second={})
    numbers = dict(confidence=0.9, faces=0, noise_level=0.02, jpeg_artifacts=0.05, blur=0.2, width=640, height=480)
    anime = decide(AnalysisNumbers(content_type="anime", **numbers), machine)
    offered = {alt["model"]: alt for alt in anime.alternatives}
    assert "tiny-compact" in offered and "your anime model (×3)" in offered["tiny-compact"]["why"]
    expected = manager.spec("tiny-compact").macs_per_pixel * 640 * 480 * 1.1 / 100e9
    assert offered["tiny-compact"]["estimated_seconds"] == round(expected, 1)
    photo = decide(AnalysisNumbers(content_type="photo", **numbers), machine)
    assert "tiny-compact" not in {alt["model"] for alt in photo.alternatives}
    assert {alt["model"] for alt in photo.alternatives} & {"tiny-rrdb", "tiny-swinir"}


def test_the_advisor_calibrates_the_users_models_on_first_use(weights_dir, tmp_path):
    """The user's models the advisor offers are timed once, with their own weights, and the measurement kept."""
    import json

    from config import Config
    from engine.catalog import CATALOG, user_alternatives
    from engine.intelligent_enhancer import IntelligentEnhancer, ThroughputCalibrator
    from engine.model_manager import ModelManager

    config = Config.from_env(env={}, dotenv_path=None, weights_dir=weights_dir, config_dir=tmp_path / "cfg",
                             download_retries=0, device="cpu")
    cache = tmp_path / "cfg" / "calibration.json"
    cache.parent.mkdir()
    calibrator = ThroughputCalibrator(cache)
    cache.write_text(json.dumps({calibrator.key(name, "cpu"): 1e9 for name in CATALOG}))  # the built-ins known
    manager = ModelManager(config)
    advisor = IntelligentEnhancer(manager, config, device="cpu")  # the default config: no trial
    advisor.calibrator = ThroughputCalibrator(cache, busy_share=0.0)  # kept even when other work shares the CPU
    photo = _advisor_image("OST_009.png", 64, 48)  # a real photo: the user's two photo/general models are offered for it
    advice = advisor.advise(photo)
    assert advice.analysis["content_type"] == "photo"
    offered = [s.name for s in user_alternatives(advice.analysis["content_type"]) if manager.is_available(s.name)][:2]
    assert len(offered) == 2
    measured = json.loads(cache.read_text())
    for name in offered:
        assert measured[calibrator.key(name, "cpu")] > 0 and f"{name}@" in " ".join(manager.loaded_models())
    assert {alt["model"] for alt in advice.alternatives} >= set(offered)
    advisor.calibrator._measure = None  # a second advice measures nothing: it would fail here
    assert advisor.advise(photo).alternatives == advice.alternatives


# ------------------------------------------------------------------------------------------------ trial


def _nearest_x4(folder: Path) -> Path:
    """A real ×4 Compact network whose last convolution is zero: its output is its built-in nearest-neighbour
    upsampling of the input, which rebuilds a shrunk crop far better than random weights do."""
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(0)
    net = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=4)
    last = net.body[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    torch.save(net.state_dict(), folder / "near.pth")
    return folder / "near.pth"


def test_the_trial_takes_the_users_x4_models_of_each_side():
    from engine.advisor.trial import ANIME_MODEL, PHOTO_MODEL, trial_models
    from engine.catalog import CATALOG

    def own(name: str, tag: str, scale: int = 4, kind: str = "sr"):
        return dataclasses.replace(CATALOG[PHOTO_MODEL], name=name, tag=tag, scale=scale, kind=kind, url=None)

    import dataclasses

    specs = [*CATALOG.values(), own("p4", "photo"), own("a4", "anime"), own("p2", "photo", 2),
             own("t4", "text"), own("g4", "general"), own("f", "face", 1, "face"), own("p4-missing", "photo")]
    available = {"p4", "a4", "p2", "t4", "g4", "f"}
    assert trial_models(specs, available) == {PHOTO_MODEL: "photo", ANIME_MODEL: "anime", "p4": "photo",
                                              "a4": "anime"}
    assert trial_models(specs, available, limit=1) == {PHOTO_MODEL: "photo", ANIME_MODEL: "anime", "p4": "photo"}
    assert trial_models(specs, ()) == {PHOTO_MODEL: "photo", ANIME_MODEL: "anime"}


def _advise_unsure_drawing(tmp_path, env: dict[str, str]):
    """The advice on a small crop of the comic (a drawing the classifier is unsure about) with the official photo
    and anime models as random weights of their real architectures (checksums off) and the user's ×4 photo model
    ``tiny-near`` (nearest-neighbour upsampling) imported; ``env`` is the config's environment. Returns
    ``(advice, model manager)``."""
    from engine.advisor.trial import ANIME_MODEL, PHOTO_MODEL
    from engine.catalog import CATALOG
    from engine.image_analysis import analyze
    from engine.intelligent_enhancer import IntelligentEnhancer, ThroughputCalibrator
    from engine.model_manager import ModelManager
    from engine.models.loader import reference_network

    from config import Config

    weights = tmp_path / "w"
    weights.mkdir()
    torch.manual_seed(0)
    for name in (PHOTO_MODEL, ANIME_MODEL):
        spec = CATALOG[name]
        torch.save({"params_ema": reference_network(spec.arch, spec.arch_params).state_dict()},
                   weights / spec.filename)
    config = Config.from_env(env=env, dotenv_path=None, weights_dir=weights, config_dir=tmp_path / "cfg",
                             download_retries=0, device="cpu", verify_checksums=False)
    manager = ModelManager(config)
    manager.user_catalog.import_model(str(_nearest_x4(tmp_path)), name="tiny-near", kind="photo")
    image = _unsure_comic()
    assert analyze(image).content_decided_by == "unsure"  # the case the trial is for

    advisor = IntelligentEnhancer(manager, config, device="cpu")
    cache = tmp_path / "cfg" / "calibration.json"
    advisor.calibrator = ThroughputCalibrator(cache)
    cache.parent.mkdir(exist_ok=True)  # every model's speed known: nothing is calibrated here
    cache.write_text(json.dumps({advisor.calibrator.key(n, "cpu"): 1e11 for n in [*CATALOG, "tiny-near"]}))
    return advisor.advise(image), manager


def test_a_users_model_that_rebuilds_the_trial_crop_best_is_offered_first(tmp_path):
    """With time for a trial (``REALESRGAN_ADVISOR_TRIAL_SECONDS``), the unsure drawing goes to the trial
    reconstruction and the user's ×4 photo model joins it. The official pair (random weights: the compact model,
    which adds the upscaled input, far closer than the random RRDBNet) says photo; the user's model rebuilt the crop
    best on that side, so the advice offers it first, with the margin."""
    from engine.advisor.trial import ANIME_MODEL, PHOTO_MODEL

    advice, _ = _advise_unsure_drawing(tmp_path, {"REALESRGAN_ADVISOR_TRIAL_SECONDS": "30"})
    assert advice.analysis["content_decided_by"] == "trial"
    scores = advice.analysis["trial"]
    assert set(scores) == {PHOTO_MODEL, ANIME_MODEL, "tiny-near"}
    assert scores["tiny-near"] > max(scores[PHOTO_MODEL], scores[ANIME_MODEL])
    assert advice.analysis["content_type"] == "photo" and advice.settings.model == PHOTO_MODEL
    first = advice.alternatives[0]
    margin = scores["tiny-near"] - scores[PHOTO_MODEL]
    assert first["model"] == "tiny-near"
    assert f"on a test crop it was {margin:.1f} dB closer than {PHOTO_MODEL}" in first["why"]
    assert any(r.startswith("Try tiny-near, your photo model") for r in advice.reasons)


def test_with_no_time_for_a_trial_an_unsure_image_gets_the_photo_model(tmp_path):
    """A trial budget of 0 runs no trial: the unsure drawing gets the photo model, the reason says why, and no
    model is loaded for it."""
    from engine.advisor.trial import PHOTO_MODEL

    advice, manager = _advise_unsure_drawing(tmp_path, {"REALESRGAN_ADVISOR_TRIAL_SECONDS": "0"})
    assert advice.analysis["content_decided_by"] == "unsure" and advice.analysis["trial"] is None
    reason = advice.analysis["content_reason"]
    assert advice.settings.model == PHOTO_MODEL and "the safer mistake" in reason
    assert "trial" not in reason  # not even considered ("No time for a trial..." would mean a budget was set)
    assert manager.loaded_models() == []


def test_by_default_an_unsure_image_is_settled_by_the_trial_with_the_real_models(config, tmp_path):
    """The default config has time for the trial on a machine of known speed (no model loaded yet: their loads
    are counted): on the unsure comic crop the photo model and the compact anime model (the bundled weights)
    rebuild a test crop, and the decision is the trial rule's on that gap, quoted in the reason."""
    from engine.advisor.trial import ANIME_MODEL, PHOTO_MODEL
    from engine.catalog import CATALOG
    from engine.image_analysis import analyze, decide_content
    from engine.intelligent_enhancer import IntelligentEnhancer, ThroughputCalibrator
    from engine.model_manager import ModelManager

    image = _unsure_comic()
    analysis = analyze(image)
    assert analysis.content_decided_by == "unsure" and config.advisor_trial_seconds > 0
    advisor = IntelligentEnhancer(ModelManager(config), config, device="cpu")
    cache = tmp_path / "calibration.json"  # a 2-core CPU's speed, fixed: the budget check does not depend on load
    advisor.calibrator = ThroughputCalibrator(cache)
    cache.write_text(json.dumps({advisor.calibrator.key(n, "cpu"): 1e11 for n in CATALOG}))
    advice = advisor.advise(image)
    scores = advice.analysis["trial"]
    assert advice.analysis["content_decided_by"] == "trial" and set(scores) == {PHOTO_MODEL, ANIME_MODEL}
    gap = scores[ANIME_MODEL] - scores[PHOTO_MODEL]
    expected = decide_content(analysis.content_logit, 0, gap)
    assert advice.analysis["content_type"] == expected.label
    assert f"came {gap:+.1f} dB closer than the photo model" in advice.analysis["content_reason"]


# ------------------------------------------------------------------------------------------------ face models
FACE_PHOTO = Path(__file__).resolve().parent / "data" / "faces" / "blake_lively_245.png"  # one face


@pytest.fixture(scope="module")
def face_files(tmp_path_factory) -> dict[str, Path]:
    """Two tiny face networks of spandrel's classes: a narrow GFPGAN (``.pth``) and a RestoreFormer
    (``.safetensors``), random weights."""
    from safetensors.torch import save_file
    from spandrel.architectures.GFPGAN import GFPGAN
    from spandrel.architectures.RestoreFormer import RestoreFormer

    folder = tmp_path_factory.mktemp("face-models")
    torch.manual_seed(0)
    gfpgan = GFPGAN(narrow=0.125, channel_multiplier=1)
    torch.save({"params_ema": gfpgan.state_dict()}, folder / "tiny-gfpgan.pth")
    former = RestoreFormer(n_embed=32, embed_dim=32, ch=32, ch_mult=(1, 1, 1, 1, 1, 2), z_channels=32,
                           num_res_blocks=1)
    save_file({k: v.contiguous() for k, v in former.state_dict().items()}, folder / "tiny-former.safetensors")
    return {"gfpgan": folder / "tiny-gfpgan.pth", "former": folder / "tiny-former.safetensors"}


def test_face_networks_are_imported_as_face_models_and_offered_as_such(tmp_path, face_files, model_files,
                                                                     monkeypatch, capsys):
    import main
    from engine.models.user_catalog import UserCatalog
    from engine.settings import face_model_choices, sr_model_choices

    monkeypatch.setenv("REALESRGAN_WEIGHTS_DIR", str(tmp_path / "w"))
    monkeypatch.setenv("REALESRGAN_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("REALESRGAN_LOG_DIR", str(tmp_path / "logs"))
    assert main.main(["models", "add", str(face_files["gfpgan"])]) == 0  # no --kind: detected
    assert main.main(["models", "add", str(face_files["former"]), "--kind", "face"]) == 0
    entries = UserCatalog(tmp_path / "w").entries()
    assert {n: (m.architecture, m.kind, m.scale) for n, m in entries.items()} == {
        "tiny-gfpgan": ("GFPGAN", "face", 1), "tiny-former": ("RestoreFormer", "face", 1)}
    assert all(m.macs_per_pixel > 0 for m in entries.values())
    assert face_model_choices()[-2:] == ("tiny-gfpgan", "tiny-former") and "GFPGANv1.4" in face_model_choices()
    assert not {"tiny-gfpgan", "tiny-former"} & set(sr_model_choices())
    args = main.build_parser().parse_args(["enhance", "in.png", "-o", "out.png", "--face-enhance",
                                          "--face-model", "tiny-former"])
    assert args.face_model == "tiny-former"

    capsys.readouterr()
    assert main.main(["models", "list"]) == 0
    listed = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert listed["tiny-gfpgan"] == "face*" and listed["GFPGANv1.4"] == "face"

    assert main.main(["models", "add", str(face_files["gfpgan"]), "--name", "as-photo", "--kind", "photo"]) != 0
    assert "a face restoration network (GFPGAN)" in capsys.readouterr().err
    assert main.main(["models", "add", str(model_files["tiny-span"]), "--name", "span-face", "--kind", "face"]) != 0
    assert "not a face restoration network" in capsys.readouterr().err
    assert set(UserCatalog(tmp_path / "w").entries()) == {"tiny-gfpgan", "tiny-former"}


@pytest.mark.parametrize("name", ["tiny-gfpgan", "tiny-former"])
def test_an_imported_face_model_restores_every_detected_face(tmp_path, face_files, name):
    """The engine's face enhancer runs the user's network like an official one: loaded from the pinned file by the
    model manager, every detected face restored and pasted back, the rest of the image the background."""
    from PIL import Image

    from engine.face_enhancer import FaceSettings, enhance_faces
    from engine.models.user_catalog import UserCatalog

    UserCatalog(tmp_path / "w").import_model(str(face_files[name.split("-")[1]]), name=name)
    manager = _manager(tmp_path / "w")
    image = np.asarray(Image.open(FACE_PHOTO).convert("RGB"))
    background = np.repeat(np.repeat(image, 2, axis=0), 2, axis=1)
    result = enhance_faces(image, background, settings=FaceSettings(model=name, strength=1.0), model_manager=manager)
    assert result.faces_detected >= 1 and result.faces_restored == result.faces_detected, result.warnings
    changed = np.abs(result.image.astype(int) - background).max(axis=2) > 0
    x0, y0, x1, y1 = (int(v) for v in result.boxes[0])
    assert changed[y0:y1, x0:x1].mean() > 0.5  # the face was replaced by the network's output...
    assert x0 > 64 and not changed[:, : x0 - 32].any()  # ...and away from it nothing changed
    assert f"{name}@cpu" in " ".join(manager.loaded_models())


def test_the_pipeline_pastes_faces_into_a_16_bit_output_in_place(tmp_path, face_files, model_files):
    """enhance_image pastes restored faces into its output itself: only the face's region changes, and a 16-bit
    image keeps its 16-bit pixels everywhere else (the output is not copied to 8 bits and back)."""
    from PIL import Image

    from engine.models.user_catalog import UserCatalog
    from engine.processor import enhance_image_direct
    from engine.settings import EnhanceSettings

    catalog = UserCatalog(tmp_path / "w")
    catalog.import_model(str(face_files["gfpgan"]), name="tiny-gfpgan")
    catalog.import_model(str(model_files["tiny-span"]), name="tiny-span", kind="photo")
    manager = _manager(tmp_path / "w")
    photo = np.asarray(Image.open(FACE_PHOTO).convert("RGB")).astype(np.uint16) * 257
    photo = photo + np.random.default_rng(0).integers(0, 200, photo.shape, dtype=np.uint16)  # below 8 bits' step
    settings = EnhanceSettings(model="tiny-span", device="cpu", precision="fp32", quality_metrics=False, tile=64,
                               face_model="tiny-gfpgan", face_strength=1.0, force_face_enhance=True)
    plain = enhance_image_direct(photo, settings, manager, config=manager.config).pixels
    faces = enhance_image_direct(photo, settings.replace(face_enhance=True), manager, config=manager.config)
    assert faces.faces_restored >= 1 and faces.pixels.dtype == np.uint16, faces.warnings
    changed = (faces.pixels != plain).any(axis=2)
    assert 0 < changed.mean() < 0.5  # the face's region changed, the rest is the 16-bit upscale itself...
    assert (faces.pixels[~changed] % 257).any()  # ...with values an 8-bit copy could not hold


def test_gray_and_rgba_networks_run_as_rgb_networks():
    from spandrel.architectures.Compact import Compact

    from engine.models.loader import detect_network, rgb_network

    torch.manual_seed(0)
    image = torch.rand(1, 3, 8, 8)
    for channels in (1, 4):
        built = detect_network(Compact(num_in_ch=channels, num_out_ch=channels, num_feat=4, num_conv=1,
                                       upscale=2).state_dict()).built
        assert (built.input_channels, built.output_channels) == (channels, channels)
        net = rgb_network(built.module, channels, channels)
        with torch.inference_mode():
            out = net(image)
            own = built.module(image.mean(dim=1, keepdim=True) if channels == 1
                               else torch.cat([image, torch.ones_like(image[:, :1])], dim=1))
        assert out.shape == (1, 3, 16, 16)
        assert torch.equal(out, own.expand(-1, 3, -1, -1) if channels == 1 else own[:, :3])
