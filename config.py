"""One typed configuration object, read from environment variables (prefix ``REALESRGAN_``) and ``.env``.

Nothing happens at import: call :meth:`Config.from_env` to read the environment, and
:meth:`Config.ensure_directories` when the app starts and really needs the folders.
Every field is documented in ``.env.example``; its variable name is ``REALESRGAN_`` + the field name in capitals.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, Mapping, get_args, get_origin, get_type_hints

ENV_PREFIX = "REALESRGAN_"
APP_NAME = "realesrgan-ultimate"

MemoryPolicy = Literal["keep", "per_request"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


def _default_cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME))


def _default_data_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME))


def _default_config_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_config_dir(APP_NAME))


@dataclass(frozen=True)
class Config:
    """Every setting of the app. Build with :meth:`from_env`; fields are validated on construction."""

    # Directories
    weights_dir: Path = field(default_factory=lambda: _default_cache_dir() / "weights")
    output_dir: Path = field(default_factory=lambda: _default_data_dir() / "outputs")
    temp_dir: Path = field(default_factory=lambda: _default_cache_dir() / "tmp")
    config_dir: Path = field(default_factory=_default_config_dir)
    log_dir: Path = field(default_factory=lambda: _default_data_dir() / "logs")
    log_level: LogLevel = "INFO"

    # Server
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    auth: str | None = None  # "user:password"
    allow_share_without_auth: bool = False
    concurrency_per_device: int = 1
    max_queue_size: int = 16
    api_key: str | None = None
    warm_models: tuple[str, ...] = ()
    job_time_limit_seconds: float = 600.0  # a job running longer is stopped at its next tile
    rate_limit_per_minute: int = 60  # work requests per client address and minute; 0 = no limit
    idle_timer_slack_ms: float = 50.0  # Linux: server timers may fire this late, so an idle app sleeps; 0 = off

    # Retention (per-job result folders under output_dir/web, Gradio's cache under temp_dir)
    retention_hours: float = 24.0
    retention_max_mb: float = 2048.0
    min_free_disk_mb: float = 1024.0  # new work is refused when the output disk has less free space

    # Features
    enable_face_enhancement: bool = True
    enable_video: bool = True
    enable_batch: bool = True
    # The advisor's trial reconstruction (a tie-breaker when the content classifier is unsure) runs when it is
    # expected to take at most this many seconds (its models' loads counted until they are loaded); 0 = never.
    advisor_trial_seconds: float = 1.5

    # Limits
    max_upload_mb: float = 50.0
    max_input_pixels: int = 40_000_000
    max_output_pixels: int = 400_000_000
    max_video_mb: float = 1000.0
    max_video_seconds: float = 600.0
    max_video_frames: int = 36_000
    max_faces: int = 20
    memory_reserve_mb: float = 512.0  # RAM left to the system and other jobs when a job plans its memory
    max_job_memory_mb: float = 0.0  # most RAM the process may reach for one image job (0: what is available)

    # GPU / devices
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    gpu_memory_reserve: float = 0.1  # fraction of free VRAM left untouched when sizing tiles
    memory_policy: MemoryPolicy = "keep"
    allow_cpu_fallback: bool = True
    cpu_memory_reuse: bool = True  # keep freed tensor memory mapped during CPU inference (glibc; utils.allocator)

    # Models
    verify_checksums: bool = True
    mirror_url: str | None = None  # base URL of a local mirror that holds the weight files by name
    download_timeout: float = 60.0
    download_retries: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1-65535, got {self.port}")
        if not 0.0 <= self.gpu_memory_reserve < 1.0:
            raise ValueError(f"gpu_memory_reserve must be in [0, 1), got {self.gpu_memory_reserve}")
        if self.auth is not None and ":" not in self.auth:
            raise ValueError("auth must look like 'user:password'")
        for name in ("concurrency_per_device", "max_queue_size", "max_input_pixels", "max_output_pixels",
                     "max_video_frames", "max_faces"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_upload_mb", "max_video_mb", "max_video_seconds", "download_timeout",
                     "job_time_limit_seconds", "retention_hours", "retention_max_mb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("rate_limit_per_minute", "min_free_disk_mb", "memory_reserve_mb", "max_job_memory_mb",
                     "idle_timer_slack_ms", "advisor_trial_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        _check_device(self.device)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, dotenv_path: str | os.PathLike | None = ".env",
                 **overrides) -> "Config":
        """Read ``REALESRGAN_*`` variables from ``env`` (default ``os.environ``) over ``.env`` values.

        Args:
            env: variables to read; ``os.environ`` when None.
            dotenv_path: a ``.env`` file whose values apply where ``env`` has none; None to skip.
            **overrides: field values that win over both (for CLI flags).

        Raises:
            ValueError: a variable that does not parse or is out of range, naming the variable.
        """
        values: dict[str, str] = {}
        if dotenv_path is not None and Path(dotenv_path).is_file():
            from dotenv import dotenv_values

            values.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
        values.update(os.environ if env is None else env)

        hints = get_type_hints(cls)
        kwargs = {}
        for f in fields(cls):
            var = ENV_PREFIX + f.name.upper()
            if var in values:
                try:
                    kwargs[f.name] = _parse(values[var], hints[f.name])
                except ValueError as exc:
                    raise ValueError(f"{var}={values[var]!r}: {exc}") from None
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kwargs)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def ensure_directories(self) -> None:
        """Create the app's folders (called by main at start, never at import)."""
        for d in (self.weights_dir, self.output_dir, self.temp_dir, self.config_dir, self.log_dir):
            Path(d).mkdir(parents=True, exist_ok=True)

    @property
    def log_file(self) -> Path:
        return Path(self.log_dir) / "realesrgan_app.log"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def auth_pair(self) -> tuple[str, str] | None:
        if not self.auth:
            return None
        user, _, password = self.auth.partition(":")
        return user, password


def _check_device(device: str) -> None:
    if device in ("auto", "cpu", "cuda", "mps"):
        return
    if device.startswith("cuda:") and device[5:].isdigit():
        return
    raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(raw: str, hint) -> object:
    raw = raw.strip()
    origin, args = get_origin(hint), get_args(hint)
    if hint is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError("expected true/false")
    if hint is int:
        return int(raw)
    if hint is float:
        return float(raw)
    if hint is Path:
        return Path(raw).expanduser()
    if hint is str:
        return raw
    if origin is Literal:
        if raw not in args:
            raise ValueError(f"expected one of {', '.join(args)}")
        return raw
    if origin is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if type(None) in args:  # Optional[X]
        if raw == "" or raw.lower() == "none":
            return None
        inner = next(a for a in args if a is not type(None))
        return _parse(raw, inner)
    raise ValueError(f"unsupported type {hint}")
