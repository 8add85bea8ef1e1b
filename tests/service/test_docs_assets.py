"""/docs and /redoc load every asset from the server itself (an air-gapped deployment works)."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from service.docs_assets import ASSETS_PATH


def _asset_urls(html: str) -> list[str]:
    return re.findall(r'(?:src|href|url)\s*[:=]\s*["\']([^"\']+)["\']', html)


def test_docs_pages_reference_only_local_assets_that_are_served(client: TestClient) -> None:
    for page, wanted in (
        ("/docs", {"swagger-ui-bundle.js", "swagger-ui.css"}),
        ("/redoc", {"redoc.standalone.js"}),
    ):
        response = client.get(page)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
        html = response.text
        assert "http://" not in html and "https://" not in html, f"{page} loads something from outside"
        urls = [u for u in _asset_urls(html) if u.startswith(ASSETS_PATH)]
        assert {u.rsplit("/", 1)[1] for u in urls} >= wanted
        for url in urls:
            asset = client.get(url)
            assert asset.status_code == 200, url
            assert len(asset.content) > 1000, url
    js = client.get(f"{ASSETS_PATH}/swagger-ui-bundle.js")
    assert "javascript" in js.headers["content-type"] and b"SwaggerUIBundle" in js.content
    assert client.get("/openapi.json").status_code == 200


def test_docs_assets_refuse_traversal_and_unknown_files(client: TestClient) -> None:
    assert client.get(f"{ASSETS_PATH}/../../etc/passwd").status_code == 404
    assert client.get(f"{ASSETS_PATH}/nope.js").status_code == 404
