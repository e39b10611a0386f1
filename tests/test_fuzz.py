"""Hostile images against the decoders: the bomb set and a fast subset of the mutation corpus.

Each campaign runs in a child process whose address space is capped (``RLIMIT_AS``), so a decoder that trusted a
lying header fails there (MemoryError) instead of taking the test machine down. The full 3,000+ mutations and
the timing/RSS figures are in ``bench/fuzz_decoders.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz_corpus import bombs, lying_idat_png
from utils.errors import InputTooLargeError, InvalidInputError, UnsupportedFormatError
from utils.validation import check_image_header

ROOT = Path(__file__).resolve().parent.parent

#: What the child process runs: decode every case under a memory cap and report outcome names per case.
_CAMPAIGN = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
from tests.fuzz_corpus import bombs, mutations
from utils.errors import EngineError
from utils.image_io import load_image
cases = bombs() if sys.argv[1] == "bombs" else dict(mutations(int(sys.argv[1]), seed=int(sys.argv[2])))
outcomes = {}
for name, data in cases.items():
    try:
        load_image(data, max_pixels=4_000_000)
        outcomes[name] = "decoded"
    except EngineError as exc:
        outcomes[name] = "refused:" + type(exc).__name__
    except BaseException as exc:
        outcomes[name] = "CRASH:" + type(exc).__name__ + ":" + str(exc)[:200]
print(json.dumps(outcomes))
"""


def _campaign(*args: str) -> dict[str, str]:
    done = subprocess.run([sys.executable, "-c", _CAMPAIGN, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(bombs()))
def test_bomb_headers_are_refused_before_decoding(name):
    with pytest.raises((InputTooLargeError, InvalidInputError, UnsupportedFormatError)):
        check_image_header(bombs()[name], max_pixels=40_000_000)


def test_a_png_whose_idat_claims_4_gb_is_refused_as_damaged():
    with pytest.raises(InvalidInputError, match="damaged"):
        check_image_header(lying_idat_png(), max_pixels=40_000_000)


def test_the_bomb_set_decodes_to_project_errors_only_under_a_3_gb_cap():
    outcomes = _campaign("bombs")
    assert outcomes and all(v.startswith("refused:") for v in outcomes.values()), outcomes


def test_mutated_images_give_only_project_errors_under_a_3_gb_cap():
    outcomes = _campaign("250", "1")
    crashes = {k: v for k, v in outcomes.items() if v.startswith("CRASH")}
    assert len(outcomes) == 250 and not crashes, crashes
    assert any(v == "decoded" for v in outcomes.values()) and any(v.startswith("refused") for v in outcomes.values())
