"""No cold-start tax: the bf16 verdict kept on disk, the background warm-up. Behaviour only; speed is in bench/."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from config import Config
from engine.inference import precision_check
from engine.model_manager import ModelManager
from engine.processor import enhance_image_direct, warm_up
from engine.settings import EnhanceSettings

FAST = "realesr-animevideov3"  # the small offline model
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def weights(tmp_path, model_manager_session) -> Path:
    """A weights dir of its own (no verdicts yet) holding the converted offline weights of FAST."""
    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copy(model_manager_session.import_bundled(FAST), folder)
    return folder


@pytest.fixture
def new_process(monkeypatch):
    """This process's in-memory verdicts, emptied (as a new process starts) and restored afterwards."""
    monkeypatch.setattr(precision_check, "_bf16_verdicts", {})


def _manager(weights: Path) -> ModelManager:
    return ModelManager(Config.from_env(env={}, dotenv_path=None, weights_dir=weights, download_retries=0))


def test_the_bf16_verdict_is_measured_once_and_read_back_by_a_new_manager(weights, new_process, monkeypatch):
    before = precision_check.probe_runs
    first = precision_check.bf16_psnr(_manager(weights), FAST)
    assert precision_check.probe_runs == before + 1
    stored = json.loads((weights / precision_check.VERDICTS_FILE).read_text())
    assert stored == {precision_check.verdict_key(FAST, None): first}

    monkeypatch.setattr(precision_check, "_bf16_verdicts", {})  # a new process, a new manager
    again = precision_check.bf16_psnr(_manager(weights), FAST)
    assert again == first and precision_check.probe_runs == before + 1


def test_a_second_process_reads_the_stored_verdict(weights):
    precision_check._store_verdict(weights / precision_check.VERDICTS_FILE, precision_check.verdict_key(FAST, None),
                                   55.5)
    script = ("import sys; from config import Config; from engine.model_manager import ModelManager; "
              "from engine.inference import precision_check as pc; "
              "m = ModelManager(Config.from_env(env={}, dotenv_path=None, weights_dir=sys.argv[1])); "
              "print(pc.bf16_psnr(m, sys.argv[2]), pc.probe_runs)")
    done = subprocess.run([sys.executable, "-c", script, str(weights), FAST], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=True)
    assert done.stdout.split() == ["55.5", "0"]  # the stored verdict, and no probe ran


def test_the_verdict_key_names_torch_and_the_cpu(weights, new_process):
    import torch

    here = precision_check.verdict_key(FAST, 0.5)
    assert here == precision_check.verdict_key(FAST, 0.5, torch.__version__, precision_check.cpu_signature())
    assert precision_check.verdict_key(FAST, 0.5, torch_version="0.0.1") != here
    assert precision_check.verdict_key(FAST, 0.5, cpu="x86_64-DEFAULT-000000000000") != here
    assert precision_check.verdict_key(FAST, None) != here

    # A verdict from another torch or another CPU is not this machine's: the probe runs.
    path = weights / precision_check.VERDICTS_FILE
    path.write_text(json.dumps({precision_check.verdict_key(FAST, None, torch_version="0.0.1"): 12.0,
                                precision_check.verdict_key(FAST, None, cpu="other-cpu"): 13.0}))
    before = precision_check.probe_runs
    psnr = precision_check.bf16_psnr(_manager(weights), FAST)
    assert precision_check.probe_runs == before + 1 and psnr >= precision_check.BF16_MIN_PSNR
    assert len(json.loads(path.read_text())) == 3  # the others are kept


def test_a_damaged_verdicts_file_means_measuring_again(weights, new_process):
    path = weights / precision_check.VERDICTS_FILE
    path.write_text('{"half a file": ')
    before = precision_check.probe_runs
    psnr = precision_check.bf16_psnr(_manager(weights), FAST)
    assert precision_check.probe_runs == before + 1
    assert json.loads(path.read_text()) == {precision_check.verdict_key(FAST, None): psnr}
    assert not list(weights.glob(".bf16-*"))  # no temp file left behind


def test_warm_up_in_the_background_while_a_request_runs(weights, new_process, native_bf16):
    manager = _manager(weights)
    settings = EnhanceSettings(model=FAST, device="cpu", precision="bf16", tile=0, quality_metrics=False,
                               target_width=4000)  # warm-up clears the output size: it stays a small image
    errors: list[BaseException] = []

    def warm() -> None:
        try:
            warm_up(manager, settings, side=16)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=warm)
    thread.start()
    image = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    result = enhance_image_direct(image, settings.replace(target_width=None), manager)  # during the warm-up
    thread.join(timeout=300)
    assert not errors and not thread.is_alive()
    assert result.size == (40, 48) and result.precision == "bf16"
    assert set(manager.loaded_models()) >= {f"{FAST}@cpu/bf16", f"{FAST}@cpu/fp32"}  # bf16 verdict measured
    assert (weights / precision_check.VERDICTS_FILE).is_file()


# ------------------------------------------------------------------------------------------- overlapped batch
def _folder(tmp_path: Path, count: int, broken_at: int | None = None) -> Path:
    from PIL import Image

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(count):
        path = src / f"img{i}.png"
        if i == broken_at:
            path.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        else:
            Image.fromarray(rng.integers(0, 256, (8 + i, 10, 3), dtype=np.uint8)).save(path)
    return src


def _job(out: Path, **kw) -> "BatchJob":
    from engine.inference.batch import BatchJob

    settings = EnhanceSettings(model=FAST, device="cpu", precision="fp32", tile=0, quality_metrics=False)
    return BatchJob(settings=settings, output_dir=out, **kw)


def test_an_overlapped_batch_gives_the_serial_outputs_in_order(tmp_path, model_manager_session):
    from engine.inference.batch import BatchServices, collect_inputs, run_batch

    src = _folder(tmp_path, 5, broken_at=2)
    items = collect_inputs([src])
    services = BatchServices(model_manager_session, model_manager_session.config)
    reports = {}
    for overlap in (False, True):
        seen = []
        report = run_batch(items, _job(tmp_path / f"out-{overlap}"), services, overlap=overlap, on_item=seen.append)
        assert [i.input for i in seen] == [i.input for i in report.items] == [i.source for i in items]
        reports[overlap] = report
    serial, overlapped = reports[False], reports[True]
    assert [i.ok for i in overlapped.items] == [True, True, False, True, True]
    assert overlapped.items[2].error == serial.items[2].error and "img2.png" not in overlapped.items[2].error
    for a, b in zip(serial.items, overlapped.items):
        if a.ok:
            assert a.output.read_bytes() == b.output.read_bytes() and a.output.name == b.output.name


def test_metrics_measured_behind_by_the_writer_are_the_same_as_in_the_network_s_thread(
        tmp_path, model_manager_session, monkeypatch):
    """With ``measure_behind`` (the default on a GPU) the writer thread measures each result's quality before saving
    it, while the network runs the next image: the same metrics, warnings and files as when the network's thread
    measures them (the default on the CPU)."""
    from engine.inference import pipeline
    from engine.inference.batch import BatchServices, collect_inputs, run_batch

    measured_on: list[str] = []
    real_measure = pipeline.measure

    def measure(*args, **kwargs):
        measured_on.append(threading.current_thread().name)
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(pipeline, "measure", measure)
    items = collect_inputs([_folder(tmp_path, 4, broken_at=1)])
    services = BatchServices(model_manager_session, model_manager_session.config)
    reports, threads = {}, {}
    for behind in (False, True):
        measured_on.clear()
        job = _job(tmp_path / f"out-{behind}")
        job = dataclasses.replace(job, settings=job.settings.replace(quality_metrics=True))
        reports[behind] = run_batch(items, job, services, measure_behind=behind)
        threads[behind] = set(measured_on)
        assert len(measured_on) == 3  # the broken input never reaches the network
    assert threads[False] == {threading.main_thread().name}
    assert all(name.startswith("batch-write") for name in threads[True])
    for here, behind in zip(reports[False].items, reports[True].items):
        assert here.ok == behind.ok and here.error == behind.error
        if here.ok:
            assert here.output.read_bytes() == behind.output.read_bytes()
            numbers = {k: v for k, v in here.report["metrics"].items() if isinstance(v, float)}
            assert "lr_psnr" in numbers and "metrics" in behind.report["timings"]
            assert {k: behind.report["metrics"][k] for k in numbers} == pytest.approx(numbers, rel=1e-9)
            assert {k: v for k, v in behind.report["metrics"].items() if k not in numbers} == {
                k: v for k, v in here.report["metrics"].items() if k not in numbers}
            assert behind.report["warnings"] == here.report["warnings"]


def test_the_reader_stays_at_most_read_ahead_inputs_before_the_network(tmp_path, model_manager_session):
    """A slow network (the device slot held until the reader is as far ahead as allowed): the reader never gets
    further ahead, and the items still come out whole and in order."""
    import contextlib

    from engine.inference import batch
    from engine.inference.batch import BatchServices, collect_inputs, run_batch

    items = collect_inputs([_folder(tmp_path, 4)])
    entered, reads, too_far = [], [], []
    reader_at_bound = threading.Event()

    class CountingAdvisor:  # the real advisor, counting what the reader thread asks it
        def __init__(self, advisor):
            self.advisor = advisor

        def advise(self, pixels, **kw):
            reads.append(pixels.shape)
            if len(reads) - 1 > len(entered) + batch.READ_AHEAD:  # reading input k before the network took k-N
                too_far.append((len(reads) - 1, len(entered)))
            if len(reads) == batch.READ_AHEAD + 1:
                reader_at_bound.set()
            return self.advisor.advise(pixels, **kw)

    @contextlib.contextmanager
    def slow_slot():
        if not entered:
            assert reader_at_bound.wait(timeout=300)  # only a safety net: this is set once the reader gets there
        entered.append(1)
        yield

    from engine.intelligent_enhancer import IntelligentEnhancer

    advisor = CountingAdvisor(IntelligentEnhancer(model_manager=model_manager_session,
                                                  config=model_manager_session.config))
    services = BatchServices(model_manager_session, model_manager_session.config, advisor, slot=slow_slot)
    report = run_batch(items, _job(tmp_path / "out", auto=True, explicit={"model": FAST, "tile": 0}), services)
    assert not too_far and len(reads) == len(entered) == 4
    assert report.successes == 4 and [i.input for i in report.items] == [i.source for i in items]


def test_cancelling_an_overlapped_batch_keeps_what_was_done(tmp_path, model_manager_session):
    from engine.errors import CancelledError
    from engine.inference.batch import BatchServices, collect_inputs, run_batch

    items = collect_inputs([_folder(tmp_path, 5)])
    cancel = threading.Event()
    seen = []

    def on_item(item):
        seen.append(item)
        cancel.set()  # the user cancels once the first image is done

    services = BatchServices(model_manager_session, model_manager_session.config)
    with pytest.raises(CancelledError):
        run_batch(items, _job(tmp_path / "out"), services, cancel=cancel, on_item=on_item)
    saved = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert 1 <= len(seen) < 5 and all(i.ok for i in seen)
    assert saved == sorted(i.output.name for i in seen)  # every enhanced image was saved and reported, no more
