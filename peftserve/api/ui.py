"""The web page and the API docs, served offline: ``/ui`` (the rollout page), ``/docs``, ``/redoc``.

- ``GET /`` and ``GET /ui`` redirect to ``/ui/``, the page (``peftserve/ui/index.html``); its
  scripts, styles and the vendored chart library are served from ``peftserve/ui`` under a
  Content-Security-Policy that allows this origin only.
- ``GET /ui/session`` (no credentials needed) tells the page whether the caller passes the
  admin rule: the admin token when the server has one (given as ``Authorization: Bearer``,
  the page keeps it in the browser's sessionStorage, never in a URL), else loopback only.
  The page reads admin data only once this answers ``"admin": true``.
- ``GET /admin/overview`` (admin): adapters, engine and rollouts in one answer for the page
  (``peftserve.server.dashboard.overview``).
- ``/docs`` and ``/redoc``: FastAPI's Swagger UI and ReDoc pages, with their assets vendored in
  ``peftserve/ui/vendor`` instead of a CDN.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

from peftserve import __version__
from peftserve.api.auth import is_admin, require_admin
from peftserve.api.state import get_state
from peftserve.server import dashboard

PAGE_DIR = Path(__file__).resolve().parent.parent / "ui"
"""The page's static files (installed as package data of ``peftserve``)."""
VENDOR = "/ui/vendor"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
NO_STORE = {"Cache-Control": "no-store"}

router = APIRouter(include_in_schema=False)
admin_router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


class PageFiles(StaticFiles):
    """Static files with the page's security headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response


def mount_page(app: FastAPI) -> None:
    """Serve ``peftserve/ui`` under ``/ui`` (after the routes, so ``/ui/session`` is a route)."""
    app.mount("/ui", PageFiles(directory=PAGE_DIR, html=True), name="ui")


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("ui/")


@router.get("/ui")
async def page() -> RedirectResponse:
    return RedirectResponse("ui/")


@router.get("/ui/session")
async def session(request: Request) -> Response:
    """Whether the caller may read and steer through /admin, and why not if it may not."""
    state = get_state(request)
    required = bool(state.admin_token)
    admin = is_admin(request)
    given = "authorization" in request.headers
    if admin:
        message = (
            "signed in with the admin token" if required else "local client: admin without a token"
        )
    elif required:
        message = "the admin token is not correct" if given else "sign in with the admin token"
    else:
        message = ("this server has no admin token and answers admin requests from local clients only; "
                   "start it with --admin-token (or PEFTSERVE_ADMIN_TOKEN) to use this page from elsewhere")  # fmt: skip
    body = {"object": "session", "token_required": required, "admin": admin, "message": message,
            "model": state.models.base_name, "version": __version__}  # fmt: skip
    return JSONResponse(body, headers=NO_STORE)


@admin_router.get("/overview")
async def overview(request: Request) -> dict[str, Any]:
    """The engine, every adapter version (tier, requests by arm and outcome) and the latest rollout per task."""
    s = get_state(request)
    return await dashboard.overview(s.engine, s.models, s.metrics, s.adapters, s.canary)


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    app: FastAPI = request.app
    return get_swagger_ui_html(
        openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - Swagger UI",
        swagger_js_url=f"{VENDOR}/swagger_ui/swagger-ui-bundle.js",
        swagger_css_url=f"{VENDOR}/swagger_ui/swagger-ui.css",
        swagger_favicon_url=f"{VENDOR}/swagger_ui/favicon-32x32.png",
        oauth2_redirect_url="/docs/oauth2-redirect", swagger_ui_parameters={"validatorUrl": None},
    )  # fmt: skip


@router.get("/docs/oauth2-redirect")
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    app: FastAPI = request.app
    return get_redoc_html(
        openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - ReDoc",
        redoc_js_url=f"{VENDOR}/redoc/redoc.standalone.js",
        redoc_favicon_url=f"{VENDOR}/swagger_ui/favicon-32x32.png", with_google_fonts=False,
    )  # fmt: skip
