"""Download nsfwjs from the npm registry and convert its MobileNetV2 into engine/data/scene_backbone.npz.

The package (MIT, Infinite Red) ships the model in its tarball as two JavaScript modules: the Keras topology with a
weights manifest (every tensor's name, shape and uint8 quantisation: value = min + scale * byte), and the weights
as one base64 string. This keeps every tensor as shipped (bytes, min, scale) for :mod:`engine.scene_net`, which
uses the convolutional part; the three dense layers of nsfwjs' own classifier stay so that tests can check the
conversion against the package's own output. The licence goes beside it. The tarball is
checked against its pinned SHA-256 first.

Run: .venv/bin/python bench/scene_backbone.py [--url URL] [--out engine/data]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import logging
import re
import sys
import tarfile
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import scene_net  # noqa: E402
URL = "https://registry.npmjs.org/nsfwjs/-/nsfwjs-4.4.0.tgz"
SHA256 = "585cd178f3b994337c4d10a87b080d342fc52f8b9bf0085c4d1f345a3a1c5382"
MODEL = "package/dist/models/mobilenet_v2/model.min.js"
SHARD = "package/dist/models/mobilenet_v2/group1-shard1of1.min.js"
LICENSE = "package/LICENSE"
_ENTRY = re.compile(r'\{name:"([^"]+)",shape:\[([\d,]*)\],dtype:"float32",'
                    r'quantization:\{min:(-?[\d.e+-]+),scale:([\d.e+-]+),dtype:"uint8"\}\}')
_BASE64 = re.compile(r'"([A-Za-z0-9+/]{10000,}={0,2})"')

log = logging.getLogger("scene_backbone")


def fetch(url: str = URL, sha256: str = SHA256, timeout: float = 120.0) -> bytes:
    """The tarball's bytes; ValueError when they are not the pinned ones."""
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (a fixed https URL or a test's)
        data = response.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(f"{url} has SHA-256 {digest}, expected {sha256}; not converted.")
    return data


def convert(tarball: bytes) -> tuple[dict[str, np.ndarray], str]:
    """(arrays for the npz, licence text) from the package's tarball."""
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        def text(name: str) -> str:
            member = tar.extractfile(name)
            if member is None:
                raise ValueError(f"{name} is not a file in the package.")
            return member.read().decode()
        model, shard, licence = text(MODEL), text(SHARD), text(LICENSE)
    entries = _ENTRY.findall(model)
    blobs = _BASE64.findall(shard)
    if not entries or len(blobs) != 1:
        raise ValueError(f"Unexpected package layout: {len(entries)} weights, {len(blobs)} weight blobs.")
    raw = base64.b64decode(blobs[0])
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape, low, scale in entries:
        dims = tuple(int(d) for d in shape.split(",") if d)
        count = int(np.prod(dims)) if dims else 1
        values = np.frombuffer(raw, np.uint8, count, offset).reshape(dims)
        offset += count
        key = scene_net.stored_key(name)
        arrays[key] = values.copy()
        arrays[key + ":min"] = np.float32(low)
        arrays[key + ":scale"] = np.float32(scale)
    if offset != len(raw):
        raise ValueError(f"The manifest covers {offset} bytes of the {len(raw)}-byte weights.")
    return arrays, licence


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=URL)
    parser.add_argument("--out", type=Path, default=ROOT / "engine" / "data")
    args = parser.parse_args()
    arrays, licence = convert(fetch(args.url))
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / scene_net.BACKBONE_PATH.name, **arrays)
    (args.out / "LICENSE-nsfwjs").write_text(licence)
    log.info("wrote %s: %d tensors", args.out / "scene_backbone.npz", len(arrays) // 3)


if __name__ == "__main__":
    main()
