"""The model manager with real files: tiny real architectures whose weights the test makes, served on loopback."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import pickle
import subprocess
import sys
import threading
from pathlib import Path
from types import MappingProxyType

import pytest
import torch

from engine.catalog import ModelSpec
from engine.errors import ModelNotAvailableError, UnsafeEnvironmentError
from engine.model_manager import ModelManager
from engine.models.loader import read_state_dict, reference_network, unwrap_state_dict

ROOT = Path(__file__).resolve().parent.parent


_TINY_SRVGG = MappingProxyType(dict(num_in_ch=3, num_out_ch=3, num_feat=4, num_conv=1, upscale=2, act_type="prelu"))


def _tiny_spec(name: str, url: str | None, sha: str | None, size: int | None, pair: str | None = None) -> ModelSpec:
    return ModelSpec(name=name, kind="sr", arch="SRVGGNetCompact", arch_params=_TINY_SRVGG, scale=2, url=url,
                     filename=f"{name}.pth", sha256=sha, size_bytes=size, license="test", macs_per_pixel=1,
                     denoise_pair=pair)


def _weights_bytes(seed: int) -> bytes:
    torch.manual_seed(seed)
    net = reference_network("SRVGGNetCompact", _TINY_SRVGG)
    buf = io.BytesIO()
    torch.save({"params_ema": net.state_dict()}, buf)
    return buf.getvalue()


class _Server:
    """A loopback HTTP server serving fixed files; records the paths asked for."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests = files, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                outer.requests.append(self.path)
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = _Server({})
    yield srv
    srv.close()


def _manager(config, catalog, **changes) -> ModelManager:
    return ModelManager(config.replace(weights_dir=config.output_dir.parent / "w-own", **changes), catalog)


def test_official_url_download_then_cache(config, server):
    blob = _weights_bytes(0)
    server.files["/official/tiny.pth"] = blob
    spec = _tiny_spec("tiny", server.url + "/official/tiny.pth", hashlib.sha256(blob).hexdigest(), len(blob))
    manager = _manager(config, {"tiny": spec})
    assert manager.status("tiny").available is False
    first = manager.load_model("tiny", "cpu", "fp32")
    assert manager.status("tiny").source == "weights_dir" and manager.status("tiny").available
    assert manager.load_model("tiny", "cpu", "fp32") is first  # cached by (model, device, precision)
    assert server.requests == ["/official/tiny.pth"]
    x = torch.rand(1, 3, 5, 5)
    assert first.net(x).shape == (1, 3, 10, 10)
    assert manager.unload_model("tiny") == 1
    assert manager.load_model("tiny", "cpu", "fp32") is not first


def test_mirror_is_tried_before_the_official_url(config, server):
    blob = _weights_bytes(1)
    server.files["/mirror/tiny.pth"] = blob
    spec = _tiny_spec("tiny", server.url + "/official/tiny.pth", hashlib.sha256(blob).hexdigest(), len(blob))
    manager = _manager(config, {"tiny": spec}, mirror_url=server.url + "/mirror/")
    path, source = manager.weights_path("tiny")
    assert path.read_bytes() == blob and source == "weights_dir"
    assert server.requests == ["/mirror/tiny.pth"]


def test_hand_placed_file_with_wrong_hash_is_not_used(config, server):
    good, bad = _weights_bytes(2), _weights_bytes(3)
    server.files["/official/tiny.pth"] = good
    spec = _tiny_spec("tiny", server.url + "/official/tiny.pth", hashlib.sha256(good).hexdigest(), len(good))
    manager = _manager(config, {"tiny": spec})
    manager.weights_dir.mkdir(parents=True)
    (manager.weights_dir / "tiny.pth").write_bytes(bad)  # placed by hand, but not the official file
    path, _ = manager.weights_path("tiny")
    assert path.read_bytes() == good
    assert server.requests == ["/official/tiny.pth"]


def test_weights_shipped_in_a_package_are_used_in_place_after_their_hash(config, server):
    """The LPIPS linear layers come from the installed lpips package (real file, catalog hash): offline, no
    download. A wrong file in the weights dir is skipped; a package file that does not match is refused."""
    from dataclasses import replace

    from engine.catalog import CATALOG

    spec = CATALOG["lpips-alex-v0.1"]
    manager = _manager(config, {spec.name: replace(spec, url=server.url + "/lin.pth")})
    status = manager.status(spec.name)
    assert status.available and status.source == "package" and status.path.endswith("alex.pth")
    path, source = manager.weights_path(spec.name)
    assert source == "package" and manager.local_weights(spec.name) == path
    assert manager.verify(spec.name)[0] is True
    manager.weights_dir.mkdir(parents=True)
    (manager.weights_dir / spec.filename).write_bytes(b"not the linear layers")
    assert manager.local_weights(spec.name) == path
    assert server.requests == []

    wrong = _manager(config, {spec.name: replace(spec, sha256="0" * 64, url=None)})
    assert wrong.local_weights(spec.name) is None
    with pytest.raises(ModelNotAvailableError):
        wrong.weights_path(spec.name)


def test_local_weights_never_downloads(config, server):
    blob = _weights_bytes(6)
    server.files["/official/tiny.pth"] = blob
    spec = _tiny_spec("tiny", server.url + "/official/tiny.pth", hashlib.sha256(blob).hexdigest(), len(blob))
    manager = _manager(config, {"tiny": spec})
    assert manager.local_weights("tiny") is None and server.requests == []
    manager.download("tiny")
    assert manager.local_weights("tiny").read_bytes() == blob


def test_missing_weights_without_any_source_says_how_to_get_them(config, server):
    spec = _tiny_spec("tiny", server.url + "/gone/tiny.pth", "0" * 64, 10)
    manager = _manager(config, {"tiny": spec})
    with pytest.raises(ModelNotAvailableError, match="tiny.pth"):
        manager.load_model("tiny", "cpu")


def test_denoise_strength_interpolates_the_two_networks(config, server):
    strong, weak = _weights_bytes(4), _weights_bytes(5)
    server.files.update({"/s.pth": strong, "/w.pth": weak})
    catalog = {
        "strong": _tiny_spec("strong", server.url + "/s.pth", hashlib.sha256(strong).hexdigest(), len(strong),
                             pair="weak"),
        "weak": _tiny_spec("weak", server.url + "/w.pth", hashlib.sha256(weak).hexdigest(), len(weak)),
    }
    manager = _manager(config, catalog)
    s = unwrap_state_dict(torch.load(io.BytesIO(strong), weights_only=True))
    w = unwrap_state_dict(torch.load(io.BytesIO(weak), weights_only=True))
    mixed, _ = manager.load_state_dict("strong", denoise_strength=0.3)
    for key in s:
        torch.testing.assert_close(mixed[key], 0.3 * s[key] + 0.7 * w[key])
    a = manager.load_model("strong", "cpu", "fp32", denoise_strength=0.3)
    b = manager.load_model("strong", "cpu", "fp32", denoise_strength=0.8)
    assert a is not b and a.denoise_strength == 0.3


def test_per_request_policy_does_not_cache(config, server):
    blob = _weights_bytes(6)
    server.files["/t.pth"] = blob
    spec = _tiny_spec("tiny", server.url + "/t.pth", hashlib.sha256(blob).hexdigest(), len(blob))
    manager = _manager(config, {"tiny": spec}, memory_policy="per_request")
    with manager.use_model("tiny", "cpu", "fp32") as loaded:
        assert loaded.net is not None
    assert manager.loaded_models() == []


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_that_runs_code_fails_to_load_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps({"params_ema": _Evil(marker)}))
    zipped = tmp_path / "zipped.pth"
    torch.save({"params_ema": _Evil(marker)}, zipped)
    for path in (legacy, zipped):
        with pytest.raises(ModelNotAvailableError, match="damaged or not a plain weights file"):
            read_state_dict(path)
    assert not marker.exists()


def test_unsafe_torch_environment_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    torch.save({"params": {"a": torch.zeros(1)}}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UnsafeEnvironmentError, match="unset TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        read_state_dict(path)
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "models", "list"], capture_output=True,
                          text=True, timeout=300, env={**_clean_env(tmp_path), "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert done.returncode != 0 and "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" in done.stderr


def test_unwrap_prefers_params_ema_and_strips_module_prefix():
    a, b = torch.zeros(1), torch.ones(1)
    assert unwrap_state_dict({"params": {"x": a}, "params_ema": {"module.x": b}})["x"] is b
    assert unwrap_state_dict({"params": {"x": a}})["x"] is a
    assert unwrap_state_dict({"x": a})["x"] is a


def _clean_env(tmp_path: Path) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("REALESRGAN_")}
    env.update(HOME=str(tmp_path), REALESRGAN_WEIGHTS_DIR=str(tmp_path / "weights"),
               REALESRGAN_LOG_DIR=str(tmp_path / "logs"), REALESRGAN_OUTPUT_DIR=str(tmp_path / "out"),
               REALESRGAN_CONFIG_DIR=str(tmp_path / "cfg"), REALESRGAN_TEMP_DIR=str(tmp_path / "tmp"))
    return env


def test_cli_models_list_json_lists_every_official_model(tmp_path):
    from tests.test_catalog import OFFICIAL

    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "models", "list", "--json"], capture_output=True,
                          text=True, timeout=300, env=_clean_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    for name, (size, sha) in OFFICIAL.items():
        row = rows[name]
        assert (row["size_bytes"], row["sha256"]) == (size, sha)
        assert {"kind", "scale", "url", "available", "path", "source"} <= set(row)
    # The offline weights are available from a fresh machine (converted on first use).
    for name in ("RealESRGAN_x4plus", "RealESRGAN_x4plus_anime_6B", "realesr-animevideov3"):
        assert rows[name]["available"] is True and rows[name]["source"] == "bundled"
    assert rows["GFPGANv1.4"]["available"] is False
    assert rows["lpips-alex-v0.1"]["available"] is True and rows["lpips-alex-v0.1"]["source"] == "package"
    assert rows["lpips-alexnet"]["available"] is False and rows["arcface-ir-se50"]["kind"] == "metric"
