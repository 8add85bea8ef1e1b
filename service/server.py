"""``predgate serve``: validate the bundle, then run uvicorn until SIGTERM.

The bundle and gate are loaded before the port is bound, so a bad bundle never yields a server that
answers health checks; the loaded gate is handed to the app. On SIGTERM/SIGINT uvicorn stops accepting
connections and waits (up to ``graceful_timeout_s``) for in-flight requests; the app's lifespan then
drains the batcher, so every queued image is answered before the process exits.

With ``workers > 1`` (``PREDGATE_WORKERS``) uvicorn's supervisor starts that many worker processes on
one socket. Each loads the bundle itself (:func:`worker_app`; the settings travel as
``PREDGATE_*`` variables) and has its own batcher, and the metrics go through prometheus-client's
multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` (a fresh temporary directory when unset) is emptied of
earlier runs' files before the workers start, since values left by dead processes would be summed in.
The supervisor passes SIGTERM to every worker, each shuts down gracefully as above, and restarts a
worker that dies.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

import uvicorn
from pydantic import SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.errors import BundleError, ConfigError
from service import metrics
from service.main import app_from_env, create_app
from service.settings import Settings
from service.state import load_service

EXIT_BAD_INPUT = 2
EXIT_STARTUP_FAILED = 3
WORKER_APP = "service.server:worker_app"
WORKER_HEALTHCHECK_S = 60
_METRIC_FILE = re.compile(r"_(\d+)\.db$")


class ForgetOnShutdown:
    """ASGI wrapper: once the app's lifespan has shut down, this process's live gauges leave the
    multiprocess directory, so a stopped worker's queue depth and in-flight count stop being summed."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_and_forget(message: Message) -> None:
            await send(message)
            if message["type"] == "lifespan.shutdown.complete":
                metrics.forget_this_process()

        await self.app(scope, receive, send_and_forget)


def worker_app() -> ASGIApp:
    """Factory run by each uvicorn worker: the app from the ``PREDGATE_*`` environment."""
    return ForgetOnShutdown(app_from_env())


def prepare_multiprocess_dir(keep_pid: int | None = None) -> Path:
    """``PROMETHEUS_MULTIPROC_DIR`` (set to a new temporary directory if unset), emptied of the value
    files of every process but ``keep_pid`` (this one, whose metrics may already be open there)."""
    name = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    directory = Path(name) if name else Path(tempfile.mkdtemp(prefix="predgate-metrics-"))
    directory.mkdir(parents=True, exist_ok=True)
    for path in directory.glob("*.db"):
        match = _METRIC_FILE.search(path.name)
        if match is None or int(match.group(1)) != keep_pid:
            path.unlink(missing_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return directory


def settings_environment(settings: Settings) -> dict[str, str | None]:
    """``settings`` as the ``PREDGATE_*`` variables that rebuild it in a worker (None = unset)."""
    env: dict[str, str | None] = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, bool):
            value = "true" if value else "false"
        env[f"PREDGATE_{name.upper()}"] = None if value is None else str(value)
    return env


def _serve_workers(settings: Settings) -> int:
    """``settings.workers`` uvicorn workers over ``service.main:app_from_env`` (see the module doc)."""
    for key, value in settings_environment(settings).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    # one gate per worker: split the cores between them unless told otherwise
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // settings.workers)))
    directory = prepare_multiprocess_dir(keep_pid=os.getpid())
    logging.getLogger("predgate.service").info(
        "%d workers, metrics in multiprocess mode (%s)", settings.workers, directory
    )
    # a worker imports torch and the service before it can answer the supervisor's ping: on a busy
    # machine that takes longer than uvicorn's 5 s default, and the worker would be killed and respawned
    extra: dict[str, int] = {}
    if "timeout_worker_healthcheck" in inspect.signature(uvicorn.run).parameters:
        extra["timeout_worker_healthcheck"] = WORKER_HEALTHCHECK_S
    try:
        uvicorn.run(
            WORKER_APP,
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=settings.log_level.lower(),
            timeout_graceful_shutdown=int(settings.graceful_timeout_s),
            timeout_keep_alive=max(1, round(settings.keep_alive_s)),
            lifespan="on",
            **extra,
        )
    except SystemExit as exc:
        if exc.code in (None, 0):
            return 0
        print(
            f"predgate serve: could not start on {settings.host}:{settings.port} (see the log above)",
            file=sys.stderr,
        )
        return EXIT_STARTUP_FAILED
    return 0


def serve(settings: Settings) -> int:
    """Serve ``settings.bundle`` on ``settings.host:settings.port``; returns the process exit code.

    2 for a bad bundle or setting (message on stderr, nothing bound); 3 if uvicorn could not start
    (e.g. the port is taken). After a graceful shutdown on SIGTERM/SIGINT uvicorn re-raises the signal,
    so the process ends with that signal's status (143 for SIGTERM), as supervisors expect; 0 when the
    server stops otherwise.
    """
    try:
        loaded = load_service(settings)
    except BundleError as exc:
        print(f"predgate serve: bad bundle: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ConfigError as exc:
        print(f"predgate serve: bad setting: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # configured only now, so that a refused start leaves the caller's logging untouched
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.workers > 1:
        del loaded  # validated; every worker loads its own
        return _serve_workers(settings)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        prepare_multiprocess_dir(keep_pid=os.getpid())  # one worker, multiprocess mode asked for
    app = ForgetOnShutdown(create_app(settings, loaded=loaded))
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=int(settings.graceful_timeout_s),
        timeout_keep_alive=max(1, round(settings.keep_alive_s)),
        lifespan="on",
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits this way when it cannot bind or start the app
        if exc.code in (None, 0):
            return 0
        print(
            f"predgate serve: could not start on {settings.host}:{settings.port} (see the log above)",
            file=sys.stderr,
        )
        return EXIT_STARTUP_FAILED
    return 0 if server.started else EXIT_STARTUP_FAILED


def main(argv: list[str] | None = None) -> int:
    """``python -m service.server [--bundle PATH] [--host H] [--port P] [--workers N]``;
    other settings from ``PREDGATE_*``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m service.server", description=main.__doc__)
    parser.add_argument("--bundle")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--workers", type=int, help="uvicorn worker processes (default 1)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return serve(Settings(**overrides))


if __name__ == "__main__":
    sys.exit(main())
