"""Load on the REST API: many concurrent clients, and clients that hang up.

Starts the REST API on a loopback port in this process (uvicorn, the bundled offline weights of
realesr-animevideov3 ×2, CPU) and, with asyncio + httpx:

1. sends ``--requests`` enhance requests at once (a 32×32 PNG each) at ``--concurrency`` slots and a line of 16,
   and reports the most jobs ever running (sampled every 5 ms), the status counts (200 / 429 / 5xx), latency
   percentiles per status, the Retry-After values and the process RSS;
2. sends ``--abandoned`` long requests (a 512×512 PNG, tile 32) whose clients hang up 1 s later, and reports how
   long after the last hang-up every slot was free and the line empty.

    python bench/load_api.py --concurrency 1
    python bench/load_api.py --concurrency 2 --requests 100 --abandoned 20
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

logger = logging.getLogger("bench.load_api")


def rss_mb() -> float:
    with open("/proc/self/status") as fp:
        for line in fp:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def percentiles(values: list[float]) -> str:
    if not values:
        return "-"
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return f"p50 {pick(0.5) * 1000:.0f} ms, p90 {pick(0.9) * 1000:.0f} ms, p99 {pick(0.99) * 1000:.0f} ms"


class Sampler:
    """Samples the limiter's running and waiting counts in a thread."""

    def __init__(self, limiter):
        self.limiter, self.max_running, self.max_waiting = limiter, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.max_running = max(self.max_running, self.limiter.running)
            self.max_waiting = max(self.max_waiting, self.limiter.waiting)
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


async def burst(url: str, n: int, image: bytes, fields: dict) -> list[tuple[int, float, str | None]]:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=n)) as client:
        async def one():
            start = time.perf_counter()
            r = await client.post("/api/v1/enhance", files={"file": ("in.png", image, "image/png")}, data=fields)
            return r.status_code, time.perf_counter() - start, r.headers.get("Retry-After")

        return await asyncio.gather(*(one() for _ in range(n)))


async def abandon(url: str, n: int, image: bytes, fields: dict, after: float) -> None:
    async def one():
        async with httpx.AsyncClient(base_url=url, timeout=after) as client:
            try:
                await client.post("/api/v1/enhance", files={"file": ("in.png", image, "image/png")}, data=fields)
            except httpx.TimeoutException:
                pass  # the client gives up and closes its connection

    await asyncio.gather(*(one() for _ in range(n)))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("ui.rest_api").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--abandoned", type=int, default=20)
    args = parser.parse_args()

    from config import Config
    from engine.model_manager import ModelManager
    from tests.test_rest_api import FAST_MODEL, _png, _services, serve

    root = Path(tempfile.mkdtemp(prefix="load-api-"))
    config = Config.from_env(env={}, dotenv_path=None, weights_dir=root / "w", output_dir=root / "out",
                             temp_dir=root / "tmp", config_dir=root / "cfg", log_dir=root / "logs",
                             download_retries=0, device="cpu", concurrency_per_device=args.concurrency,
                             max_queue_size=16)
    config.ensure_directories()
    manager = ModelManager(config)
    manager.load_model(FAST_MODEL, "cpu")
    services = _services(config, manager)
    with serve(services) as url:
        rss_before = rss_mb()
        with Sampler(services.limiter) as sampler:
            started = time.perf_counter()
            results = asyncio.run(burst(url, args.requests, _png(32, 32), {"model": FAST_MODEL}))
            wall = time.perf_counter() - started
        by_status: dict[int, list[float]] = {}
        for status, seconds, _retry in results:
            by_status.setdefault(status, []).append(seconds)
        retry = sorted({int(r) for s, _, r in results if s == 429 and r})
        logger.info("%d concurrent requests at concurrency %d (line 16): most running %d, most waiting %d; "
                    "statuses %s; %.1f s in all; RSS %.0f → %.0f MB", args.requests, args.concurrency,
                    sampler.max_running, sampler.max_waiting,
                    ", ".join(f"{k}×{len(v)}" for k, v in sorted(by_status.items())), wall, rss_before, rss_mb())
        for status, values in sorted(by_status.items()):
            logger.info("  %d: %s", status, percentiles(values))
        if retry:
            logger.info("  Retry-After values: %s s; measured drain %.2f s per job",
                        ", ".join(map(str, retry)), services.limiter.stats().seconds_per_completion)

        long_job = {"model": FAST_MODEL, "tile": "32", "upscale_factor": "2"}
        with Sampler(services.limiter) as sampler:
            asyncio.run(abandon(url, args.abandoned, _png(512, 512), long_job, after=1.0))
            hung_up = time.perf_counter()
            while services.limiter.running or services.limiter.waiting:
                time.sleep(0.01)
            freed = time.perf_counter() - hung_up
        logger.info("%d clients hung up 1 s after sending a long job: most running %d, waiting %d; every slot "
                    "free and the line empty %.2f s after the last hang-up; RSS %.0f MB", args.abandoned,
                    sampler.max_running, sampler.max_waiting, freed, rss_mb())


if __name__ == "__main__":
    main()
