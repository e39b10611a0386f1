"""The model loader (engine.models.loader) through the real model manager: spandrel builds what it knows and gives
the official implementation's output, the catalog's declaration is checked, unsafe files and environments are
refused, and the helper networks (RetinaFace, ParseNet) are built once per process, not per image.

Every network is a real architecture with random weights the test makes; nothing touches the network.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
import torch
from PIL import Image

from engine.catalog import CATALOG, ModelSpec
from engine.errors import ModelNotAvailableError, UnsafeEnvironmentError
from engine.model_manager import ModelManager
from engine.models import loader
from engine.models.loader import (OWN_BUILDERS, SPANDREL_ARCHITECTURES, build_network, read_state_dict,
                                  reference_network)
from tests.conftest import unverified_manager
from tests.test_model_manager import _Evil

FACES = Path(__file__).resolve().parent / "data" / "faces"

_RRDB_X4 = MappingProxyType(dict(num_in_ch=3, num_out_ch=3, num_feat=8, num_block=1, num_grow_ch=32, scale=4))
_RRDB_X2 = MappingProxyType({**_RRDB_X4, "num_block": 2, "scale": 2})  # pixel-unshuffled input, as x2plus
_SRVGG_X4 = MappingProxyType(dict(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=4, act_type="prelu"))
_TINY = {"rrdb-x4": ("RRDBNet", _RRDB_X4, 4), "rrdb-x2": ("RRDBNet", _RRDB_X2, 2),
         "srvgg-x4": ("SRVGGNetCompact", _SRVGG_X4, 4)}


def _tiny_spec(name: str, arch: str, params, scale: int, filename: str | None = None) -> ModelSpec:
    return ModelSpec(name=name, kind="sr", arch=arch, arch_params=params, scale=scale, url=None,
                     filename=filename or f"{name}.pth", sha256=None, size_bytes=None, license="test")


def _manager(tmp_path: Path, *specs: ModelSpec) -> ModelManager:
    from config import Config

    config = Config.from_env(env={}, dotenv_path=None, weights_dir=tmp_path, download_retries=0)
    return ModelManager(config, {spec.name: spec for spec in specs})


def _reference(arch: str, params, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return reference_network(arch, params).eval()


# ------------------------------------------------------------------------------------------------ pure facts
def test_every_catalog_architecture_has_a_loader():
    known = set(SPANDREL_ARCHITECTURES) | set(OWN_BUILDERS)
    unbuilt = {spec.arch for spec in CATALOG.values()} - known
    assert unbuilt == {"AlexNet"}  # the LPIPS trunk: built together with the linear layers that name it
    assert any(CATALOG[spec.trunk].arch == "AlexNet" for spec in CATALOG.values() if spec.trunk)
    assert not set(SPANDREL_ARCHITECTURES) & set(OWN_BUILDERS)  # our own builders only where spandrel has none


# ------------------------------------------------------------------------ the reference code's output, exactly
@pytest.mark.parametrize("tiny", sorted(_TINY))
def test_the_catalog_upscalers_are_the_official_networks_bit_for_bit(tiny):
    """Official-layout RRDBNet and SRVGGNetCompact weights build the app's own module (no spandrel import): the
    official implementation's output to the bit, and spandrel's build of the same weights agrees."""
    arch, params, scale = _TINY[tiny]
    official = _reference(arch, params)
    built = build_network(arch, official.state_dict(), params)
    assert type(built.module).__module__ == "engine.models.networks"
    assert built.architecture == SPANDREL_ARCHITECTURES[arch] and built.scale == scale
    assert (built.input_channels, built.output_channels) == (3, 3)
    assert built.supports_half and built.supports_bfloat16
    assert not any(p.requires_grad for p in built.module.parameters()) and not built.module.training
    by_spandrel = loader._build_with_spandrel(arch, official.state_dict(), params)
    assert type(by_spandrel.module).__module__.startswith("spandrel.")
    x = torch.rand(1, 3, 12, 16)
    with torch.inference_mode():
        ours, theirs, spandrels = built.module(x), official(x), by_spandrel.module(x)
    assert ours.shape == theirs.shape == (1, 3, 12 * scale, 16 * scale)
    assert torch.equal(ours, theirs)
    assert (ours - spandrels).abs().max().item() <= 1e-5


@pytest.mark.parametrize("params", [_RRDB_X4, _RRDB_X2], ids=["x4", "x2"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_rrdbnet_upsamples_in_bands_of_rows_with_the_same_output(params, layout, monkeypatch):
    """The upsampling stage (most of a whole pass's memory) runs on bands of rows with two rows of context each:
    every band is small, and the output is the official one to the bit, in the input's memory layout."""
    from engine.models import networks

    official = _reference("RRDBNet", params)
    net = build_network("RRDBNet", official.state_dict(), params).module
    x = torch.rand(2, 3, 40 * 4 // params["scale"], 28).contiguous(memory_format=layout)  # body: 40 rows
    heights: list[int] = []
    net.conv_hr.register_forward_hook(lambda _m, args, _out: heights.append(args[0].shape[2]))
    with torch.inference_mode():
        whole = net(x)
        monkeypatch.setattr(networks, "TAIL_BAND_BYTES", 1)  # bands of TAIL_MIN_ROWS
        banded = net(x)
        expected = official(x)
    assert heights[0] == 40 * 4  # one band while the stage fits TAIL_BAND_BYTES
    rows = networks.TAIL_MIN_ROWS
    assert len(heights) == 1 + 3 and max(heights[1:]) == (rows + 2 * networks.TAIL_HALO) * 4
    assert torch.equal(banded, whole)
    if layout == torch.contiguous_format:  # the reference's layout (in NHWC its x2 unshuffle differs in the last bit)
        assert torch.equal(banded, expected)
    assert (banded - expected).abs().max().item() <= 1e-5
    assert banded.is_contiguous(memory_format=layout) and banded.shape == (2, 3, 160, 28 * params["scale"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("batch", [1, 2])
def test_rrdbnet_dense_blocks_write_their_outputs_in_place_with_the_reference_values(dtype, layout, batch):
    """Inference skips torch.cat (each activated output goes straight into the next convolution's input): the
    same values as BasicSR's ops to the bit in either layout and precision; with autograd, the reference ops."""
    from engine.models import networks

    official = _reference("RRDBNet", {**_RRDB_X4, "num_feat": 16, "num_grow_ch": 8, "num_block": 2})
    net = build_network("RRDBNet", official.state_dict(), _RRDB_X4 | {"num_feat": 16, "num_grow_ch": 8,
                                                                      "num_block": 2}).module.to(dtype)
    x = torch.rand(batch, 3, 12, 20).to(dtype).contiguous(memory_format=layout)
    cats: list[int] = []
    with torch.inference_mode(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "cat", lambda *a, **k: cats.append(1) or torch._C._VariableFunctions.cat(*a, **k))
        fast = net(x)
        assert not cats
        patch.setattr(networks._DenseBlock, "forward", networks._DenseBlock._reference)
        reference = net(x)
    assert len(cats) == 4 * 3 * 2  # four per dense block: the reference ops were the ones measured against
    assert torch.equal(fast, reference) and fast.dtype == dtype
    trainable = build_network("RRDBNet", official.state_dict(), _RRDB_X4 | {"num_feat": 16, "num_grow_ch": 8,
                                                                            "num_block": 2}).module
    leaf = torch.rand(1, 3, 12, 20, requires_grad=True)
    trainable(leaf).sum().backward()  # out= writes would raise here
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("arch, params", [
    ("RRDBNet", {**_RRDB_X4, "scale": 1}),  # pixel-unshuffled by 4
    ("RRDBNet", {**_RRDB_X2, "num_in_ch": 1, "num_out_ch": 1, "num_grow_ch": 4}),  # gray
    ("SRVGGNetCompact", {**_SRVGG_X4, "upscale": 3, "num_conv": 1}),
    ("SRVGGNetCompact", {**_SRVGG_X4, "upscale": 2, "num_in_ch": 1, "num_out_ch": 1}),
])
def test_the_hyper_parameters_are_read_from_the_weights(arch, params):
    official = _reference(arch, params)
    built = build_network(arch, official.state_dict(), {})
    assert type(built.module).__module__ == "engine.models.networks"
    scale = params.get("scale", params.get("upscale"))
    assert (built.scale, built.input_channels, built.output_channels) == (scale, params["num_in_ch"],
                                                                          params["num_out_ch"])
    x = torch.rand(1, params["num_in_ch"], 8, 12)
    with torch.inference_mode():
        assert torch.equal(built.module(x), official(x))


def test_other_layouts_of_the_catalog_architectures_go_to_spandrel():
    """What is not the official layout (old-ESRGAN keys, x8, which BasicSR's RRDBNet has no layers for) is left to
    spandrel, which detects it from the weights."""
    from spandrel.architectures.ESRGAN.__arch.RRDB import RRDBNet as OldRRDBNet

    x = torch.rand(1, 3, 8, 12)
    for scale in (4, 8):
        net = OldRRDBNet(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale).eval()
        assert "model.0.weight" in net.state_dict()
        built = build_network("RRDBNet", net.state_dict(), {"scale": scale})
        assert type(built.module).__module__.startswith("spandrel.") and built.scale == scale
        with torch.inference_mode():
            assert torch.equal(built.module(x), net(x))


@pytest.mark.parametrize("arch, params, missing", [("SRVGGNetCompact", _SRVGG_X4, "body.6.weight"),
                                                    ("RRDBNet", _RRDB_X4, "conv_hr.weight"),
                                                    ("RRDBNet", _RRDB_X4, "body.0.rdb1.conv1.weight")])
def test_a_damaged_official_layout_is_refused_with_a_message(arch, params, missing):
    state = _reference(arch, params).state_dict()
    assert missing in state
    del state[missing]
    with pytest.raises(ModelNotAvailableError, match="use the official file|damaged"):
        build_network(arch, state, params)


def test_the_official_networks_take_the_weights_without_copying_or_initialising():
    state = _reference("RRDBNet", _RRDB_X4).state_dict()
    built = build_network("RRDBNet", state, _RRDB_X4)
    weights = dict(built.module.named_parameters())
    assert all(weights[key].data_ptr() == value.data_ptr() for key, value in state.items())


def test_spandrel_gfpgan_reads_its_width_from_the_weights():
    """spandrel builds GFPGAN at the official width only; the loader reads the width from the tensor shapes, so a
    quarter-width network (the tests' fast stand-in) loads and equals gfpgan's own implementation."""
    params = {**CATALOG["GFPGANv1.4"].arch_params, "narrow": 0.25}
    official = _reference("GFPGANv1Clean", params)
    built = build_network("GFPGANv1Clean", official.state_dict(), params)
    assert type(built.module).__module__.startswith("spandrel.") and built.architecture == "GFPGAN"
    x = torch.rand(1, 3, 512, 512) * 2 - 1
    with torch.inference_mode():
        ours = built.module(x, return_rgb=False, randomize_noise=False)[0]
        theirs = official(x, return_rgb=False, randomize_noise=False)[0]
    assert (ours - theirs).abs().max().item() <= 1 / 255


# --------------------------------------------------------------------------------- weights files, the manager
@pytest.mark.parametrize("tiny", sorted(_TINY))
@pytest.mark.parametrize("wrap", ["plain", "params_ema", "params", "dataparallel"])
def test_weights_files_load_through_the_manager_with_the_right_scale(tmp_path, tiny, wrap):
    arch, params, scale = _TINY[tiny]
    state = _reference(arch, params).state_dict()
    payload = {"plain": state, "params_ema": {"params_ema": state, "params": {}},
               "params": {"params": state}, "dataparallel": {f"module.{k}": v for k, v in state.items()}}[wrap]
    spec = _tiny_spec(tiny, arch, params, scale)
    torch.save(payload, tmp_path / spec.filename)
    loaded = _manager(tmp_path, spec).load_model(tiny, "cpu", "fp32")
    assert loaded.architecture == SPANDREL_ARCHITECTURES[arch]
    with torch.inference_mode():
        assert loaded.net(torch.rand(1, 3, 6, 10)).shape == (1, 3, 6 * scale, 10 * scale)


def test_legacy_pickle_and_safetensors_files_load(tmp_path):
    from safetensors.torch import save_file

    state = _reference("SRVGGNetCompact", _SRVGG_X4).state_dict()
    legacy = tmp_path / "legacy.pth"  # torch's pre-zip format: loaded without memory mapping
    torch.save({"params_ema": state}, legacy, _use_new_zipfile_serialization=False)
    safetensors = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, safetensors)
    for path in (legacy, safetensors):
        assert all(torch.equal(read_state_dict(path)[k], v) for k, v in state.items())
    spec = _tiny_spec("st", "SRVGGNetCompact", _SRVGG_X4, 4, filename="net.safetensors")
    assert _manager(tmp_path, spec).load_model("st", "cpu", "fp32").architecture == "Compact"


def test_a_weights_file_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    spec = _tiny_spec("evil", "SRVGGNetCompact", _SRVGG_X4, 4)
    torch.save({"params_ema": {"body.0.weight": _Evil(marker)}}, tmp_path / spec.filename)
    with pytest.raises(ModelNotAvailableError, match="damaged or not a plain weights file"):
        _manager(tmp_path, spec).load_model("evil", "cpu", "fp32")
    (tmp_path / "legacy.pth").write_bytes(pickle.dumps({"params": _Evil(marker)}))
    with pytest.raises(ModelNotAvailableError):
        read_state_dict(tmp_path / "legacy.pth")
    assert not marker.exists()


def test_weights_that_are_not_the_declared_network_are_refused(tmp_path):
    compact = _tiny_spec("compact", "SRVGGNetCompact", _SRVGG_X4, 4)
    torch.save(_reference("SRVGGNetCompact", _SRVGG_X4).state_dict(), tmp_path / compact.filename)
    as_rrdb = dataclasses.replace(compact, name="as-rrdb", arch="RRDBNet", arch_params=_RRDB_X4)
    as_x2 = dataclasses.replace(compact, name="as-x2", arch_params=MappingProxyType({**_SRVGG_X4, "upscale": 2}))
    manager = _manager(tmp_path, compact, as_rrdb, as_x2)
    with pytest.raises(ModelNotAvailableError, match="Compact network, not the RRDBNet"):
        manager.load_model("as-rrdb", "cpu", "fp32")
    with pytest.raises(ModelNotAvailableError, match="x4 SRVGGNetCompact network, the catalog declares x2"):
        manager.load_model("as-x2", "cpu", "fp32")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "unknown.pth")
    unknown = _tiny_spec("unknown", "RRDBNet", _RRDB_X4, 4)
    with pytest.raises(ModelNotAvailableError, match="not a network spandrel knows"):
        _manager(tmp_path, unknown).load_model("unknown", "cpu", "fp32")


# ----------------------------------------------------------------------------- helper networks: once, safely
def _counting(monkeypatch, arch: str) -> list[int]:
    """Count the constructions of an own-builder architecture (the real builder still runs)."""
    built = []
    original = OWN_BUILDERS[arch]

    def build(params, state_dict):
        built.append(1)
        return original(params, state_dict)

    monkeypatch.setitem(loader.OWN_BUILDERS, arch, build)
    return built


def _image(name: str) -> np.ndarray:
    return np.asarray(Image.open(FACES / name).convert("RGB"))


def _bicubic_x2(image: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.resize(image, (image.shape[1] * 2, image.shape[0] * 2), interpolation=cv2.INTER_CUBIC)


def test_retinaface_is_built_once_for_many_images_and_both_callers(helper_weights_dir, monkeypatch):
    from engine.face_enhancer import FaceSettings, enhance_faces
    from engine.intelligent_enhancer import IntelligentEnhancer

    built = _counting(monkeypatch, "RetinaFace")
    manager = unverified_manager(helper_weights_dir)
    advisor = IntelligentEnhancer(model_manager=manager, calibrate=False)
    for name in ("blake_lively_245.png", "00017_gray_250.png"):
        image = _image(name)
        result = enhance_faces(image, _bicubic_x2(image), settings=FaceSettings(strength=0.0), model_manager=manager)
        assert result.detector == "retinaface"
        assert advisor.advise(image).analysis["face_detector"] == "retinaface"
    assert built == [1]
    assert manager.loaded_models() == ["detection_Resnet50_Final@cpu/fp32"]


def test_damaged_retinaface_weights_leave_both_callers_the_cascade_with_a_warning(tmp_path, caplog):
    """The advisor gets its detector where the face enhancer does (one function, the jobs' device): unusable
    weights give the built-in cascade and a warning in both, not a failed analysis."""
    from engine.face_enhancer import FaceSettings, enhance_faces
    from engine.intelligent_enhancer import IntelligentEnhancer

    (tmp_path / CATALOG["detection_Resnet50_Final"].filename).write_bytes(b"PK\x03\x04 not a weights file")
    manager = unverified_manager(tmp_path)
    image = _image("blake_lively_245.png")
    with caplog.at_level("WARNING", logger="engine.face_enhancer"):
        advice = IntelligentEnhancer(model_manager=manager, calibrate=False).advise(image)
        result = enhance_faces(image, _bicubic_x2(image), settings=FaceSettings(strength=0.0), model_manager=manager)
    assert advice.analysis["face_detector"] == "lbp-cascade" and advice.analysis["faces"] >= 1
    assert result.detector == "lbp-cascade"
    assert sum("RetinaFace unusable" in r.getMessage() for r in caplog.records) == 2


def test_retinaface_out_of_memory_leaves_the_cascade_with_a_warning(helper_weights_dir, caplog):
    """A device without room for RetinaFace's pass (a GPU busy with another job; raised here by a hook, as CUDA
    raises it) gives the cascade's faces and a warning, not a failed analysis or job."""
    from engine.face_detect import detect_faces

    net = unverified_manager(helper_weights_dir).local_network("detection_Resnet50_Final")
    image = _image("blake_lively_245.png")

    def failing(error: Exception):
        def hook(_module, _args):
            raise error
        return hook

    hook = net.register_forward_pre_hook(failing(torch.OutOfMemoryError("CUDA out of memory. Tried 2.00 GiB")))
    try:
        with caplog.at_level("WARNING", logger="engine.face_detect"):
            found = detect_faces(image, retinaface=net)
    finally:
        hook.remove()
    assert found.detector == "lbp-cascade" and found.faces == detect_faces(image).faces and found.faces
    assert any("RetinaFace ran out of memory" in r.getMessage() for r in caplog.records)
    hook = net.register_forward_pre_hook(failing(RuntimeError("another failure")))
    try:
        with pytest.raises(RuntimeError, match="another failure"):  # anything else still surfaces
            detect_faces(image, retinaface=net)
    finally:
        hook.remove()


def test_parsenet_is_built_once_for_many_images(helper_weights_dir, tmp_path, monkeypatch):
    """No RetinaFace here (the cascade finds the faces), a quarter-width GFPGAN restores them, ParseNet masks
    every face of both images: one construction."""
    from engine.face_enhancer import FaceSettings, enhance_faces

    parsenet = CATALOG["parsing_parsenet"].filename
    (tmp_path / parsenet).symlink_to(helper_weights_dir / parsenet)
    face_model = _reference("GFPGANv1Clean", {**CATALOG["GFPGANv1.4"].arch_params, "narrow": 0.25})
    torch.save({"params_ema": face_model.state_dict()}, tmp_path / CATALOG["GFPGANv1.4"].filename)
    built = _counting(monkeypatch, "ParseNet")
    manager = unverified_manager(tmp_path)
    restored = 0
    for name in ("blake_lively_245.png", "00017_gray_250.png"):
        image = _image(name)
        result = enhance_faces(image, _bicubic_x2(image), settings=FaceSettings(strength=1.0, max_faces=1),
                               model_manager=manager)
        assert result.detector == "lbp-cascade" and not any("ParseNet" in w for w in result.warnings)
        restored += result.faces_restored
    assert restored == 2 and built == [1]


def test_the_safe_environment_check_applies_to_retinaface(helper_weights_dir, monkeypatch):
    from engine.face_enhancer import FaceSettings, enhance_faces
    from engine.intelligent_enhancer import IntelligentEnhancer

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    manager = unverified_manager(helper_weights_dir)
    image = _image("blake_lively_245.png")
    with pytest.raises(UnsafeEnvironmentError, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        manager.local_network("detection_Resnet50_Final")
    with pytest.raises(UnsafeEnvironmentError):
        enhance_faces(image, _bicubic_x2(image), settings=FaceSettings(), model_manager=manager)
    with pytest.raises(UnsafeEnvironmentError):
        IntelligentEnhancer(model_manager=manager, calibrate=False).advise(image)
    assert manager.loaded_models() == []
