"""Decoder fuzzing campaign: the bomb set and 3,000+ mutated PNG/JPEG/WebP/TIFF/BMP files through the app's loader.

Everything decodes in a child process capped with ``RLIMIT_AS`` (3 GB by default), one child per batch, so a
decoder that trusts a lying header fails there instead of taking the machine down. Reported: per bomb the time to
refusal and the RSS growth; for the mutations the outcome counts (decoded, refused by a project error, crashed
with anything else, hung past the per-file timeout) and the child's peak RSS.

    python bench/fuzz_decoders.py                    # 3,120 mutations (seed 0) + bombs
    python bench/fuzz_decoders.py --count 500 --seed 7
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("bench.fuzz_decoders")

_CHILD = r"""
import json, resource, sys, time, signal
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from tests.fuzz_corpus import bombs, mutations
from utils.errors import EngineError
from utils.image_io import load_image

def rss_mb():
    with open("/proc/self/status") as fp:
        for line in fp:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

class Hang(Exception):
    pass

def on_alarm(*_):
    raise Hang()

signal.signal(signal.SIGALRM, on_alarm)
mode = sys.argv[2]
cases = bombs() if mode == "bombs" else dict(mutations(int(sys.argv[3]), seed=int(sys.argv[4])))
rows = []
for name, data in cases.items():
    before = rss_mb()
    start = time.perf_counter()
    signal.alarm(10)
    try:
        load_image(data, max_pixels=40_000_000)
        outcome = "decoded"
    except EngineError as exc:
        outcome = "refused"
    except Hang:
        outcome = "hang"
    except BaseException as exc:
        outcome = "crash:" + type(exc).__name__ + ":" + str(exc)[:120]
    finally:
        signal.alarm(0)
    rows.append({"name": name, "bytes": len(data), "outcome": outcome, "seconds": time.perf_counter() - start,
                 "rss_growth_mb": rss_mb() - before})
print(json.dumps({"rows": rows, "peak_rss_mb": peak_mb()}))
"""


def run_child(limit_bytes: int, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(limit_bytes), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"the decoding child failed (rc {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=3120, help="mutated files (default 3120)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=1040, help="files per child process")
    parser.add_argument("--limit-gb", type=float, default=3.0, help="the child's address-space cap")
    args = parser.parse_args()
    limit = int(args.limit_gb * 2**30)

    bombs = run_child(limit, "bombs")
    logger.info("bombs (child peak RSS %.0f MB):", bombs["peak_rss_mb"])
    for row in bombs["rows"]:
        logger.info("  %-22s %8d bytes  %-9s %6.1f ms  RSS +%.1f MB", row["name"], row["bytes"], row["outcome"],
                    row["seconds"] * 1000, row["rss_growth_mb"])

    counts: dict[str, int] = {}
    peak = 0.0
    slowest = 0.0
    crashes = []
    done = 0
    seed = args.seed
    while done < args.count:
        n = min(args.batch, args.count - done)
        result = run_child(limit, "mutations", str(n), str(seed))
        peak = max(peak, result["peak_rss_mb"])
        for row in result["rows"]:
            kind = row["outcome"].split(":")[0]
            counts[kind] = counts.get(kind, 0) + 1
            slowest = max(slowest, row["seconds"])
            if kind in ("crash", "hang"):
                crashes.append(row)
        done += n
        seed += 1
    logger.info("mutations: %d files, %s; slowest %.0f ms; peak RSS of a decoding child %.0f MB (cap %.1f GB)",
                done, ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), slowest * 1000, peak, args.limit_gb)
    for row in crashes[:20]:
        logger.info("  %s: %s", row["name"], row["outcome"])


if __name__ == "__main__":
    main()
