"""The long-lived objects one app instance shares between the web UI and the REST API.

Built once by :func:`create_services` (never at import). Everything here is safe to share between requests:
the model cache locks per key, the advisor holds read-only facts, the settings manager serialises writers, and
the limiter bounds how many inferences run at once per device.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from config import Config
from engine.concurrency import DeviceLimiter
from engine.intelligent_enhancer import IntelligentEnhancer
from engine.model_manager import ModelManager
from engine.settings_manager import SettingsManager

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Services:
    config: Config
    model_manager: ModelManager
    advisor: IntelligentEnhancer
    settings: SettingsManager
    limiter: DeviceLimiter


def create_services(config: Config) -> Services:
    """Build the shared objects for ``config`` (creates the app's folders)."""
    from engine.inference.memory_plan import APP_RUNTIME_BYTES

    config.ensure_directories()
    manager = ModelManager(config, host_bytes=APP_RUNTIME_BYTES)
    return Services(
        config=config,
        model_manager=manager,
        # The warm-up (ui.app.start_warm_up) calibrates the advised models in the background: an advice never waits.
        advisor=IntelligentEnhancer(model_manager=manager, config=config, measure_in_advice=False),
        settings=SettingsManager(config.config_dir),
        limiter=DeviceLimiter(concurrency=config.concurrency_per_device, max_queue=config.max_queue_size),
    )


def warm_models(services: Services, background: bool = True) -> threading.Thread | None:
    """Convert the bundled offline weights (once) and load the models named in REALESRGAN_WARM_MODELS, so the
    first request is not slow. Runs in a background thread unless ``background`` is False."""
    if background:
        thread = threading.Thread(target=warm_models, args=(services, False), name="warm-models", daemon=True)
        thread.start()
        return thread
    try:
        services.model_manager.import_all_bundled()
    except Exception as exc:  # the offline weights are then converted on first use, or reported there
        logger.warning("could not prepare the bundled offline weights: %s", exc)
    for name in services.config.warm_models:
        try:
            services.model_manager.load_model(name, services.config.device)
            logger.info("warmed %s", name)
        except Exception as exc:  # a model that can't be warmed is loaded (or reported) on first use instead
            logger.warning("could not warm %s: %s", name, exc)
    return None
