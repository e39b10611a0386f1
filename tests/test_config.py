from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from config import ENV_PREFIX, Config

ROOT = Path(__file__).resolve().parent.parent


def test_env_overrides_dotenv_and_types(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("REALESRGAN_PORT=9000\nREALESRGAN_SHARE=true\nREALESRGAN_DEVICE=cuda:0\n")
    cfg = Config.from_env(env={"REALESRGAN_PORT": "9100", "REALESRGAN_WARM_MODELS": "a, b"}, dotenv_path=dotenv)
    assert cfg.port == 9100  # the environment wins over .env
    assert cfg.share is True
    assert cfg.device == "cuda:0"
    assert cfg.warm_models == ("a", "b")


def test_bad_values_name_the_variable():
    with pytest.raises(ValueError, match="REALESRGAN_PORT"):
        Config.from_env(env={"REALESRGAN_PORT": "eighty"}, dotenv_path=None)
    with pytest.raises(ValueError, match="REALESRGAN_MEMORY_POLICY"):
        Config.from_env(env={"REALESRGAN_MEMORY_POLICY": "sometimes"}, dotenv_path=None)
    with pytest.raises(ValueError, match="device"):
        Config.from_env(env={"REALESRGAN_DEVICE": "gpu0"}, dotenv_path=None)
    with pytest.raises(ValueError, match="auth"):
        Config(auth="no-colon")


def test_optional_values_and_auth_pair():
    cfg = Config.from_env(env={"REALESRGAN_AUTH": "ann:s3:cret", "REALESRGAN_API_KEY": ""}, dotenv_path=None)
    assert cfg.auth_pair == ("ann", "s3:cret")
    assert cfg.api_key is None


def test_construction_creates_no_directories(tmp_path):
    cfg = Config.from_env(env={"REALESRGAN_WEIGHTS_DIR": str(tmp_path / "w")}, dotenv_path=None)
    assert not (tmp_path / "w").exists()
    cfg.ensure_directories()
    assert (tmp_path / "w").is_dir()


def test_every_field_is_documented_in_env_example():
    text = (ROOT / ".env.example").read_text()
    documented = set(re.findall(rf"{ENV_PREFIX}([A-Z_]+)=", text))
    names = {f.name.upper() for f in dataclasses.fields(Config)}
    assert names - documented == set()
    assert documented - names == set()
