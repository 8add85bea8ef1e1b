"""``predgate serve``: validate the bundle, then run uvicorn (one worker) until SIGTERM.

The bundle and gate are loaded before the port is bound, so a bad bundle never yields a server that
answers health checks; the loaded gate is handed to the app. On SIGTERM/SIGINT uvicorn stops accepting
connections and waits (up to ``graceful_timeout_s``) for in-flight requests; the app's lifespan then
drains the batcher, so every queued image is answered before the process exits.
"""

from __future__ import annotations

import logging
import sys

import uvicorn

from models.errors import BundleError, ConfigError
from service.main import create_app
from service.settings import Settings
from service.state import load_service

EXIT_BAD_INPUT = 2
EXIT_STARTUP_FAILED = 3


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
    app = create_app(settings, loaded=loaded)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=int(settings.graceful_timeout_s),
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
    """``python -m service.server [--bundle PATH] [--host H] [--port P]``; other settings from ``PREDGATE_*``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m service.server", description=main.__doc__)
    parser.add_argument("--bundle")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return serve(Settings(**overrides))


if __name__ == "__main__":
    sys.exit(main())
