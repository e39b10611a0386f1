"""The web app: five tabs in one ``gr.Blocks``, served with a bounded queue, upload limits and optional auth.

:func:`build_app` builds the Blocks without launching (tests use it); :func:`launch` is what ``python main.py``
runs: it builds the shared services, refuses an unauthenticated share link, configures the queue, serves only the
app's own output and temp folders, adds the REST API (``/api/v1``) to the same server when ``ui.rest_api`` is
present, and blocks until interrupted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

import gradio as gr

from ui import tab_batch, tab_image, tab_presets, tab_system, tab_video
from ui import form as form_mod
from ui.jobs import cancel_session_jobs
from utils.errors import EXIT_OK, EXIT_USAGE
from utils.power import timer_slack_for_new_threads

logger = logging.getLogger(__name__)

TITLE = "Real-ESRGAN Ultimate"

CSS = """
.gradio-container {max-width: 1400px !important; margin: auto;}
#app-title h1 {margin-bottom: 0.1em;}
#app-title p {color: var(--body-text-color-subdued); margin-top: 0;}
#enhance-button {min-height: 48px; font-size: 1.1em;}
#result-metrics table {font-size: 0.92em;}
"""


def _theme() -> gr.themes.Base:
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="sky", neutral_hue="slate")


def build_app(services) -> gr.Blocks:
    """Build the whole UI (no server is started).

    The last-used settings are the widgets' initial values and are loaded again on every page load, so a
    restarted app shows what was used last.
    """
    initial = _initial_settings(services)
    with gr.Blocks(title=TITLE, delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown(f"# {TITLE}\nSharper, larger images and videos with Real-ESRGAN and GFPGAN — on this "
                    "computer, no upload to anyone else.", elem_id="app-title")
        with gr.Tabs():
            with gr.Tab("Image Enhancement", id="image"):
                image = tab_image.render(services, initial)
            with gr.Tab("Video", id="video"):
                video = tab_video.render(services)
            with gr.Tab("Batch", id="batch", visible=services.config.enable_batch):
                batch = tab_batch.render(services, initial)
            with gr.Tab("Presets", id="presets"):
                presets = tab_presets.render(services)
            with gr.Tab("System Info", id="system"):
                system = tab_system.render(services)

        tab_image.listen(image, services)
        tab_video.listen(video, services)
        tab_batch.listen(batch, services, image.form)
        tab_presets.listen(presets, services, image.form)
        model_changes = tab_system.listen(system, services, demo)

        def on_page_load():
            for warning in services.settings.pop_warnings():
                gr.Warning(warning)
            settings = _initial_settings(services)
            values = form_mod.settings_to_widget_values(settings)
            for name in ("model", "face_model"):  # models imported since the app started are offered too
                index = form_mod.FORM_KEYS.index(name)
                values[index] = gr.update(choices=form_mod.choices_for(name, services.model_manager),
                                          value=values[index])
            return [*values, bool(settings.get("auto_settings", True)),
                    gr.update(choices=tab_presets.preset_choices(services.settings)),
                    gr.update(choices=form_mod.sr_model_options())]

        demo.load(on_page_load, outputs=[*image.form.components, batch.auto, presets.choice, video.model],
                  api_visibility="private", queue=False)

        choosers = [w for w in (video.model, image.compare.models) if w is not None]

        def on_models_changed():  # a model imported, removed or downloaded: every model choice offers it now
            return (gr.update(choices=form_mod.choices_for("model", services.model_manager)),
                    gr.update(choices=form_mod.choices_for("face_model")),
                    *[gr.update(choices=form_mod.sr_model_options())] * len(choosers))

        for event in model_changes:
            event.success(on_models_changed, outputs=[image.form.widgets["model"], image.form.widgets["face_model"],
                                                      *choosers],
                          api_visibility="private", queue=False)

        def on_unload(request: gr.Request):  # the page or API client went away: its running jobs stop
            cancel_session_jobs(request.session_hash)

        demo.unload(on_unload)
    return demo


def _initial_settings(services) -> dict:
    try:
        return services.settings.load_settings()
    except Exception as exc:  # a broken settings folder must not stop the app; defaults are fine
        logger.warning("could not load the last-used settings: %s", exc)
        from engine.settings_manager import DEFAULT_SETTINGS

        return dict(DEFAULT_SETTINGS)


def configure_queue(demo: gr.Blocks, config) -> gr.Blocks:
    """A bounded queue (users see their position) running ``concurrency_per_device`` jobs at once."""
    return demo.queue(default_concurrency_limit=config.concurrency_per_device, max_size=config.max_queue_size)


def share_refusal(config) -> str | None:
    """The message refusing a public share link without a password, or None when serving is allowed."""
    if config.share and not config.auth_pair and not config.allow_share_without_auth:
        return ("Refusing to create a public share link without a password: anyone with the link could use this "
                "computer. Add --auth user:password (or REALESRGAN_AUTH), or, if you really mean it, "
                "--allow-share-without-auth.")
    return None


def launch_kwargs(config) -> dict:
    """The arguments of ``Blocks.launch`` for ``config`` (served folders, limits, auth, theme)."""
    max_mb = config.max_upload_mb
    if config.enable_video:
        max_mb = max(max_mb, config.max_video_mb)  # video uploads are checked against their own limit later
    from ui.access import gradio_auth

    auth = gradio_auth(config)
    return dict(
        server_name=config.host, server_port=config.port, share=config.share, auth=auth,
        auth_message=None if auth is None else "Sign in to use Real-ESRGAN Ultimate."
        + ("" if config.auth_pair else " The password is the server's API key."),
        max_file_size=f"{max_mb:g}mb",
        allowed_paths=[str(Path(config.output_dir).resolve()), str(Path(config.temp_dir).resolve())],
        blocked_paths=[str(Path(p).resolve()) for p in (config.weights_dir, config.config_dir, config.log_dir)],
        show_error=True, footer_links=["api"], theme=_theme(), css=CSS, quiet=True,
    )


def start(services, *, prevent_thread_lock: bool = True, **overrides):
    """Build, queue and start the app; add the REST API. Returns ``(demo, app, local_url)``."""
    config = services.config
    os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(config.temp_dir).resolve() / "gradio"))
    from ui.uploads import remove_stale_temp_dirs

    remove_stale_temp_dirs(config)
    demo = configure_queue(build_app(services), config)
    kwargs = launch_kwargs(config) | overrides

    @contextlib.asynccontextmanager
    async def before_serving(app):
        # The server's start-up, before it accepts a connection: no request can reach the UI without the access
        # gate, or find /api/v1 missing (added after launch(), the UI answered ~40 ms before the API existed).
        install_rest_api(app, services)
        install_access_gate(app, config)
        yield

    kwargs["app_kwargs"] = {**kwargs.get("app_kwargs", {}), "lifespan": before_serving}
    # The server's threads (its event loop and the workers that loop starts) inherit a timer slack, so Gradio's
    # queue, which polls every 1 ms, lets an idle app sleep (utils.power says why requests and compute are not
    # slowed); this thread keeps its own.
    with timer_slack_for_new_threads(config.idle_timer_slack_ms / 1000):
        app, local_url, share_url = demo.launch(prevent_thread_lock=prevent_thread_lock, **kwargs)
    logger.info("web UI at %s%s", local_url, f" (public link {share_url})" if share_url else "")
    return demo, app, local_url


def install_rest_api(app, services) -> bool:
    """Add ``/api/v1`` from ``ui.rest_api`` to Gradio's FastAPI app when that module exists."""
    try:
        from ui import rest_api
    except ImportError as exc:
        logger.info("REST API not installed (%s)", exc)
        return False
    # The server's start-up has built the middleware stack already; let the API add routes and middleware (Starlette
    # rebuilds its stack on the next request when it is reset).
    app.middleware_stack = None
    rest_api.install_api(app, services)
    return True


def install_access_gate(app, config) -> None:
    """Put :class:`ui.access.AccessGate` (auth for every route that runs work or serves files, per-client rate
    limits) in front of the whole app, outermost."""
    from ui.access import AccessGate

    app.middleware_stack = None  # rebuilt on the next request
    app.add_middleware(AccessGate, gradio_app=app, config=config)


#: How often the warm-up tries the advisor's calibrations when jobs keep spoiling them (each try measures only what
#: is missing); after that the advice's stand-in rates and the real runs' figures serve.
CALIBRATION_ATTEMPTS = 3
#: Seconds without a job before the warm-up's background work starts: a client's next request usually follows the
#: last within a fraction of a second, and would otherwise share its first seconds with a calibration.
WARM_UP_SETTLE_SECONDS = 2.0


def start_warm_up(services) -> threading.Thread:
    """In the background, so the first Enhance and the first Analyze after launch pay no one-time costs:

    1. prepare the offline weights and REALESRGAN_WARM_MODELS, and run the last-used settings' model once on a
       small image (:func:`engine.processor.warm_up`); a request meanwhile waits only for a model being loaded;
    2. once no job runs or waits, nor has for :data:`WARM_UP_SETTLE_SECONDS` (these serve later requests and must
       not take a job's cores): measure this device's throughput if nothing was (so the per-job time limit is
       checked up front), set up the analysis' face detector and calibrate the models the advisor estimates (~1.5 s
       on a 2-core CPU the first time after an install, one network of each architecture), waiting again before
       each calibration; a figure that a job started during is not kept (it shared the cores) and is measured
       again at the next quiet moment; on a CPU with native bf16, check bf16 against fp32 for the warmed-up model
       (:func:`engine.inference.precision_check.check_loaded_models`)."""
    from engine import face_detect, scene_net
    from engine.inference import precision_check
    from engine.processor import warm_up
    from engine.settings import EnhanceSettings
    from ui.services import warm_models

    def run() -> None:
        started = time.perf_counter()
        warm_models(services, background=False)
        settings = EnhanceSettings.from_mapping(_initial_settings(services))
        try:
            warm_up(services.model_manager, settings)
        except Exception as exc:  # the first request loads the model itself and reports what is wrong
            logger.warning("warm-up of the default model failed: %s", exc)
            return
        # What follows serves later requests only: it waits while a job runs instead of taking the job's cores, and
        # a measurement that a job started during (sharing the cores) is not kept.
        quiet_from = [0]  # jobs granted when the last wait ended

        def wait_quiet() -> None:
            services.limiter.wait_idle(settle=WARM_UP_SETTLE_SECONDS)
            quiet_from[0] = services.limiter.granted

        def undisturbed() -> bool:
            return services.limiter.granted == quiet_from[0] and services.limiter.running == 0

        wait_quiet()
        if services.advisor is not None:  # the time limit checked up front from the first request (after a job,
            services.advisor.measure_device_rate(keep=undisturbed)  # whose run is measured, nothing is left to do)
        face_detect.warm_up()  # the first Analyze, or an automatic job, does not wait for the cascade's set-up
        scene_net.warm_up()  # nor for the scene network's weights
        if services.advisor is not None:  # nor, after an install, for the models' calibrations (tried again when
            for _attempt in range(CALIBRATION_ATTEMPTS):  # a job spoiled one)
                if services.advisor.calibrate_advised_models(before_each=wait_quiet, keep=undisturbed):
                    break
        precision_check.check_loaded_models(services.model_manager, settings.denoise_strength, before_each=wait_quiet)
        loaded = ", ".join(services.model_manager.loaded_models()) or settings.model  # "auto" resolved
        logger.info("warmed up %s in %.1f s", loaded, time.perf_counter() - started)

    thread = threading.Thread(target=run, name="warm-up", daemon=True)
    thread.start()
    return thread


def launch(config) -> int:
    """Run the web UI until interrupted (``python main.py``). Returns the process exit code."""
    refusal = share_refusal(config)
    if refusal:
        logger.error(refusal)
        print(refusal)  # noqa: T201 - the user started the app from a terminal and must see why it stopped
        return EXIT_USAGE
    from ui.services import create_services

    services = create_services(config)
    start_warm_up(services)
    demo, _app, local_url = start(services, prevent_thread_lock=True)
    print(f"Real-ESRGAN Ultimate is running at {local_url}  (Ctrl+C to stop)")  # noqa: T201
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
    return EXIT_OK
