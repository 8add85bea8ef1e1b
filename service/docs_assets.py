"""``/docs`` (Swagger UI) and ``/redoc`` from assets installed with the service, never a CDN.

FastAPI's default pages load their JavaScript and CSS from jsDelivr, so an air-gapped deployment
shows a blank page. The assets come from the ``fastapi-offline`` package (Swagger UI 5 and ReDoc,
MIT), mounted read-only under :data:`ASSETS_PATH`; the pages reference nothing outside the server.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from starlette.requests import Request
from starlette.responses import HTMLResponse

ASSETS_PATH = "/docs-assets"
ASSET_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


def assets_dir() -> Path:
    """The installed asset folder; a missing file stops the start with the package to reinstall."""
    folder = Path(str(files("fastapi_offline") / "static"))
    missing = [name for name in ASSET_FILES if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"API docs assets {missing} are missing from {folder}: reinstall fastapi-offline")
    return folder


def install_docs(app: FastAPI) -> None:
    """Serve ``/docs`` and ``/redoc`` with local assets (the app must be built with
    ``docs_url=None, redoc_url=None``)."""
    openapi_url = app.openapi_url
    if openapi_url is None:  # the app publishes no schema, so there is nothing to render
        return
    app.mount(ASSETS_PATH, StaticFiles(directory=assets_dir()), name="docs-assets")

    async def swagger(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} API",
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon.png",
        )

    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} API",
            redoc_js_url=f"{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS_PATH}/favicon.png",
            with_google_fonts=False,
        )

    app.add_route("/docs", swagger, methods=["GET"], include_in_schema=False)
    app.add_route("/redoc", redoc, methods=["GET"], include_in_schema=False)
