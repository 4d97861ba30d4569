"""/docs (Swagger UI) and /redoc with every asset served by this server.

FastAPI's own pages load Swagger UI, ReDoc, a favicon and fonts from CDNs, so offline (or
behind a firewall) /docs is a blank page. The `fastapi-offline` package ships the same
bundles; they are served under `/docs/assets/`, which sits behind the same middleware as
/docs itself (on a keyed server: the key), so nothing new becomes public.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(str(files("fastapi_offline") / "static"))  # swagger-ui-bundle.js, .css, redoc
ASSETS_URL = "/docs/assets"
FAVICON_URL = "/static/icon.svg"  # the page's icon; /static/ answers without a key
# Swagger UI's default validatorUrl shows a badge fetched from validator.swagger.io.
SWAGGER_PARAMETERS = {"validatorUrl": None}
# ReDoc's sidebar always shows Redocly's logo from its CDN (and hides it when that fails):
# the pages may load nothing from another host. Inline scripts and styles start and style
# both UIs, data: URLs are their icons, blob: is ReDoc's search worker.
DOCS_CSP = "default-src 'self' 'unsafe-inline' data: blob:"


def install_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve the documentation pages FastAPI would, from local assets.

    The app must be created with `docs_url=None, redoc_url=None` so FastAPI adds no CDN pages.
    """
    openapi_url = app.openapi_url
    if openapi_url is None:  # no schema, no docs: as FastAPI does
        return
    redirect_url = app.swagger_ui_oauth2_redirect_url or f"{docs_url}/oauth2-redirect"
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")

    def root(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        base = root(request)
        page = get_swagger_ui_html(
            openapi_url=base + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{base}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{base}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=base + FAVICON_URL,
            oauth2_redirect_url=base + redirect_url,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters={**SWAGGER_PARAMETERS, **(app.swagger_ui_parameters or {})},
        )
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

    @app.get(redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        base = root(request)
        page = get_redoc_html(
            openapi_url=base + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{base}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=base + FAVICON_URL,
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page
