from __future__ import annotations

import re

import pytest

from engine.catalog import CATALOG, FACE_MODELS, METRIC_MODELS, OFFICIAL_MODELS, SR_MODELS, get_spec

# The official release manifest, as the foundation issue lists it.
OFFICIAL = {
    "RealESRGAN_x4plus": (67040989, "4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1"),
    "RealESRNet_x4plus": (67040989, "a820b9bde89a874d7599d545567308ce6c128fc8754a53208eda016d40aa81df"),
    "RealESRGAN_x4plus_anime_6B": (17938799, "f872d837d3c90ed2e05227bed711af5671a6fd1c9f7d7e91c911a61f155e99da"),
    "RealESRGAN_x2plus": (67061725, "49fafd45f8fd7aa8d31ab2a22d14d91b536c34494a5cfe31eb5d89c2fa266abb"),
    "realesr-animevideov3": (2504012, "b8a8376811077954d82ca3fcf476f1ac3da3e8a68a4f4d71363008000a18b75d"),
    "realesr-general-x4v3": (4885111, "8dc7edb9ac80ccdc30c3a5dca6616509367f05fbc184ad95b731f05bece96292"),
    "realesr-general-wdn-x4v3": (4885111, "1641f8c4464b9f097c9fdda5589273713f67cf59f3d909e0bd688f0cee269dca"),
    "GFPGANv1.3": (348632874, "c953a88f2727c85c3d9ae72e2bd4846bbaf59fe6972ad94130e23e7017524a70"),
    "GFPGANv1.4": (348632874, "e2cd4703ab14f4d01fd1383a8a8b266f9a5833dacee8e6a79d3bf21a1b6be5ad"),
    "RestoreFormer": (290785322, "07404d446d62ca3d5ed38b1de09a947a1e77d46dbccec961a74d713a8f24ace0"),
    "detection_Resnet50_Final": (109497761, "6d1de9c2944f2ccddca5f5e010ea5ae64a39845a86311af6fdf30841b0a5a16d"),
    "parsing_parsenet": (85331193, "3d558d8d0e42c20224f13cf5a29c79eba2d59913419f945545d8cf7b72920de2"),
}

# The metric networks' published files: torchvision's AlexNet, the LPIPS v0.1 linear layers (as the lpips wheel
# ships them) and facexlib's ArcFace IR-SE50.
METRIC = {
    "lpips-alexnet": (244408911, "7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02"),
    "lpips-alex-v0.1": (6009, "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0"),
    "arcface-ir-se50": (175367323, "a035c768259b98ab1ce0e646312f48b9e1e218197a0f80ac6765e88f8b6ddf28"),
}


def test_every_official_model_is_in_the_catalog_with_its_manifest_facts():
    assert set(OFFICIAL_MODELS) == set(OFFICIAL) | set(METRIC)
    for name, (size, sha) in OFFICIAL.items():
        spec = CATALOG[name]
        assert (spec.size_bytes, spec.sha256) == (size, sha), name
        assert spec.url.startswith("https://github.com/") and "/releases/download/" in spec.url
        assert spec.url.endswith("/" + spec.filename)


def test_metric_weights_have_their_published_facts_and_stay_out_of_the_model_choices():
    assert set(METRIC_MODELS) == set(METRIC)
    for name, (size, sha) in METRIC.items():
        spec = CATALOG[name]
        assert spec.kind == "metric" and (spec.size_bytes, spec.sha256) == (size, sha), name
        assert spec.url.startswith("https://")
    # torchvision names its files after the first eight hex digits of their SHA-256
    assert CATALOG["lpips-alexnet"].url.endswith(f"-{METRIC['lpips-alexnet'][1][:8]}.pth")
    assert CATALOG["lpips-alex-v0.1"].packaged.package == "lpips"
    assert not set(METRIC_MODELS) & (set(SR_MODELS) | set(FACE_MODELS))


def test_entries_are_consistent():
    filenames = [s.filename for s in CATALOG.values()]
    assert len(filenames) == len(set(filenames))
    for spec in CATALOG.values():
        assert spec.name == get_spec(spec.name).name
        if spec.sha256:
            assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
        if spec.bundled:
            for digest in (spec.bundled.param_sha256, spec.bundled.bin_sha256, spec.bundled.state_dict_sha256):
                assert re.fullmatch(r"[0-9a-f]{64}", digest), (spec.name, digest)
        if spec.kind == "sr":
            assert spec.macs_per_pixel > 0
            assert spec.scale in (2, 3, 4)
        if spec.denoise_pair:
            assert CATALOG[spec.denoise_pair].arch_params == spec.arch_params


def test_offline_entries_cover_the_bundled_models():
    bundled = {s.name for s in CATALOG.values() if s.bundled}
    assert {"RealESRGAN_x4plus", "RealESRGAN_x4plus_anime_6B", "realesr-animevideov3",
            "realesr-animevideov3-x2", "realesr-animevideov3-x3"} <= bundled
    assert {"realesr-animevideov3-x2", "realesr-animevideov3-x3"} <= set(SR_MODELS)


def test_unknown_model_error_lists_known_names():
    with pytest.raises(KeyError, match="RealESRGAN_x4plus"):
        get_spec("nope")


@pytest.mark.parametrize("name", [n for n in SR_MODELS])
def test_sr_architectures_build_with_catalog_parameters(name):
    import torch

    from engine.models.loader import reference_network

    spec = CATALOG[name]
    net = reference_network(spec.arch, spec.arch_params).eval()
    with torch.inference_mode():
        out = net(torch.zeros(1, 3, 8, 8))
    native = spec.arch_params.get("scale", spec.arch_params.get("upscale"))
    assert out.shape == (1, 3, 8 * native, 8 * native)
