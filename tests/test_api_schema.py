"""Property-based test of the REST API against its own OpenAPI document (Schemathesis).

Schemathesis reads ``/openapi.json`` from a real server on 127.0.0.1 and generates requests for every operation
(form fields across their declared ranges and types, random and broken file bytes); every answer must be
documented for its operation, match the documented body and never be a server error. A few examples per
operation keep the default run fast.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st  # noqa: E402  (after the importorskip)

from tests.test_rest_api import FAST_MODEL, _closed_port, _offline_catalog, _services, serve  # noqa: E402


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, shared_weights_dir):
    from config import Config
    from engine.model_manager import ModelManager

    root = tmp_path_factory.mktemp("schema")
    config = Config.from_env(env={}, dotenv_path=None, weights_dir=shared_weights_dir, output_dir=root / "out",
                             temp_dir=root / "tmp", config_dir=root / "cfg", log_dir=root / "logs",
                             download_retries=0, max_upload_mb=1.0, device="cpu", max_queue_size=64)
    config.ensure_directories()
    manager = ModelManager(config, catalog=_offline_catalog(_closed_port()))  # never the network
    manager.load_model(FAST_MODEL, "cpu")
    with serve(_services(config, manager)) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


def _images() -> list[bytes]:
    """Valid small PNG/JPEG/WebP uploads and broken ones (truncated, a lying header, not an image)."""
    from tests.fuzz_corpus import lying_idat_png, seed_images

    valid = seed_images(16)
    return [valid["PNG"], valid["JPEG"], valid["WEBP"], valid["PNG"][:40], lying_idat_png(), valid["TIFF"],
            b"GIF89a\x01\x00\x01\x00", b"%PDF-1.4"]


def test_every_answer_is_documented_and_no_server_error(api_schema):
    """One Hypothesis run per operation (Schemathesis's pytest plugin needs a newer pytest than ours). The upload
    is sometimes replaced by a real image or a known-broken one, so the engine runs too, not only the refusals.

    Any bytes are schema-valid for a ``binary`` field, so Schemathesis's "valid data is accepted" check does not
    apply to an image upload (a non-image is a 415/422 by design); every other check runs, and the server-error
    check is replaced by one that allows the documented 503 of a catalog model whose weights are not here."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/api/v1/enhance", "/api/v1/health", "/api/v1/models"}
    images = _images()
    for operation in operations:
        @given(case=operation.as_strategy(), image=st.one_of(st.none(), st.sampled_from(images)))
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=True)
        def check(case, image):
            if image is not None and isinstance(case.body, dict) and "file" in case.body:
                case.body["file"] = image
            response = case.call_and_validate(excluded_checks=[positive_data_acceptance, not_a_server_error])
            # A 5xx is a server error unless it is the documented 503 for a model whose weights this offline
            # server does not have.
            if response.status_code >= 500:
                assert response.status_code == 503 and response.json()["stage"] == "model", response.text

        check()
