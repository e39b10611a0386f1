"""The model loader (engine.models.loader): spandrel builds what it knows and gives the official implementation's
output. Every network is a real architecture with random weights the test makes; nothing touches the network.
"""

from __future__ import annotations

from types import MappingProxyType

import pytest
import torch

from engine.catalog import CATALOG
from engine.models.loader import OWN_BUILDERS, SPANDREL_ARCHITECTURES, build_network, reference_network

_RRDB_X4 = MappingProxyType(dict(num_in_ch=3, num_out_ch=3, num_feat=8, num_block=1, num_grow_ch=32, scale=4))
_RRDB_X2 = MappingProxyType({**_RRDB_X4, "num_block": 2, "scale": 2})  # pixel-unshuffled input, as x2plus
_SRVGG_X4 = MappingProxyType(dict(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=4, act_type="prelu"))
_TINY = {"rrdb-x4": ("RRDBNet", _RRDB_X4, 4), "rrdb-x2": ("RRDBNet", _RRDB_X2, 2),
         "srvgg-x4": ("SRVGGNetCompact", _SRVGG_X4, 4)}


def _reference(arch: str, params, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return reference_network(arch, params).eval()


def test_spandrel_and_own_builders_do_not_overlap():
    assert not set(SPANDREL_ARCHITECTURES) & set(OWN_BUILDERS)  # our own builders only where spandrel has none


# ------------------------------------------------------------------------------ spandrel = the reference code
@pytest.mark.parametrize("tiny", sorted(_TINY))
def test_spandrel_network_gives_the_official_networks_output(tiny):
    arch, params, scale = _TINY[tiny]
    official = _reference(arch, params)
    built = build_network(arch, official.state_dict(), params)
    assert type(built.module).__module__.startswith("spandrel.")
    assert built.architecture == SPANDREL_ARCHITECTURES[arch] and built.scale == scale
    assert (built.input_channels, built.output_channels) == (3, 3)
    x = torch.rand(1, 3, 12, 16)
    with torch.inference_mode():
        ours, theirs = built.module(x), official(x)
    assert ours.shape == theirs.shape == (1, 3, 12 * scale, 16 * scale)
    assert (ours - theirs).abs().max().item() <= 1 / 255


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
