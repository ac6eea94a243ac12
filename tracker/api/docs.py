"""`/docs`: Swagger UI served from the package, so it works on a machine without internet.

FastAPI's own page loads Swagger UI's script and stylesheet from a public CDN; here they
come from `swagger-ui-bundle` (a package that ships Swagger UI's files) under
`/docs/static`.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

DOCS_STATIC = "/docs/static"


def install_docs(app: FastAPI) -> None:
    """`/docs` with local assets; FastAPI's CDN-backed `/docs` and `/redoc` must be off."""
    app.mount(DOCS_STATIC, StaticFiles(directory=str(swagger_ui_path)), name="docs-static")

    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API documentation",
            swagger_js_url=f"{DOCS_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_STATIC}/favicon-32x32.png",
        )

    # A plain route, as FastAPI adds its own /docs: not an operation of the API.
    app.add_route("/docs", swagger_ui, include_in_schema=False)
