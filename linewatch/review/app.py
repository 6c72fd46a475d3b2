"""The review page and its JSON API (FastAPI), behind one shared token.

Every route, pages and API alike, answers 401 without the token. A browser
logs in once (``/login`` sets an HttpOnly, SameSite=Strict cookie, so other
sites cannot submit verdicts with it); scripts send ``Authorization: Bearer``.
The operator's name comes from the login form (or the ``X-Operator`` header)
and is what claims and verdicts are recorded under.
"""

from __future__ import annotations

import hmac
import logging
import re
import urllib.parse
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from linewatch.review.store import DEFECT_TYPES, ReviewError, ReviewStore, check_item_id
from monitoring import metrics

log = logging.getLogger(__name__)

TOKEN_COOKIE = "lw_review_token"
OPERATOR_COOKIE = "lw_operator"
OPERATOR = re.compile(r"^[A-Za-z0-9 ._@-]{1,64}$")




def _asset(name: str) -> str:
    return resources.files("linewatch.review").joinpath(name).read_text(encoding="utf-8")


def create_app(store: ReviewStore, token: str) -> FastAPI:
    if not token:
        raise ValueError("the review service needs a token (LINEWATCH_REVIEW_TOKEN)")
    app = FastAPI(title="linewatch review", docs_url=None, redoc_url=None, openapi_url=None)
    page = _asset("page.html")
    login_form = _asset("login.html")

    def login_page(error: str = "") -> HTMLResponse:
        return HTMLResponse(login_form.replace("{error}", error), status_code=401)

    def authorised(request: Request) -> bool:
        got = request.cookies.get(TOKEN_COOKIE, "")
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            got = auth[7:].strip()
        return hmac.compare_digest(got.encode(), token.encode())

    def operator(request: Request) -> str:
        name = request.headers.get("x-operator") or request.cookies.get(OPERATOR_COOKIE) or "operator"
        if not OPERATOR.fullmatch(name):
            raise ReviewError(400, "operator names use letters, digits, space and . _ @ - (max 64)")
        return name

    @app.middleware("http")
    async def require_token(request: Request, call_next: Any) -> Response:
        if request.url.path == "/login" and request.method == "POST":
            return await call_next(request)
        if not authorised(request):
            if request.url.path.startswith("/api/") or request.method != "GET":
                return JSONResponse({"error": "a valid token is required"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
            return login_page()
        return await call_next(request)

    @app.exception_handler(ReviewError)
    async def review_error(_request: Request, exc: ReviewError) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = urllib.parse.parse_qs((await request.body()).decode("utf-8", "replace"))
        given = (form.get("token") or [""])[0]
        name = (form.get("operator") or [""])[0].strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            return login_page("Wrong token.")
        if not OPERATOR.fullmatch(name):
            return login_page("Operator names use letters, digits, space and . _ @ - (at most 64).")
        resp = RedirectResponse("/", status_code=303)
        secure = request.url.scheme == "https"
        for k, v in ((TOKEN_COOKIE, token), (OPERATOR_COOKIE, name)):
            resp.set_cookie(k, v, httponly=True, samesite="strict", secure=secure, max_age=12 * 3600)
        return resp

    @app.post("/logout")
    async def logout() -> Response:
        resp = RedirectResponse("/", status_code=303)
        resp.delete_cookie(TOKEN_COOKIE)
        resp.delete_cookie(OPERATOR_COOKIE)
        return resp

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/-/healthy")
    async def healthy() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/queue")
    def queue(request: Request) -> dict[str, Any]:
        return {"counts": store.counts(), "waiting": store.waiting(), "operator": operator(request),
                "defect_types": list(DEFECT_TYPES)}

    def public(item: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in item.items() if not k.endswith("_jpeg")}
        quoted = urllib.parse.quote(item["item_id"], safe="")
        out["frame_url"] = f"/api/items/{quoted}/frame.jpg"
        out["overlay_url"] = f"/api/items/{quoted}/overlay.jpg"
        return out

    @app.post("/api/claim")
    def claim(request: Request) -> dict[str, Any]:
        c = store.claim_next(operator(request))
        return {"item": None if c is None else public(store.item(c.item_id))}

    @app.get("/api/items/{item_id}")
    def item(item_id: str) -> dict[str, Any]:
        return public(store.item(check_item_id(item_id)))

    @app.get("/api/items/{item_id}/{which}.jpg")
    def image(item_id: str, which: str) -> Response:
        return Response(store.image(check_item_id(item_id), which), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/api/items/{item_id}/label")
    async def label(item_id: str, request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise ReviewError(400, 'send JSON: {"verdict": "normal" or "defect"}') from None
        if not isinstance(body, dict):
            raise ReviewError(400, "send a JSON object")
        verdict, dtype = body.get("verdict"), body.get("defect_type")
        store.label(check_item_id(item_id), operator(request), str(verdict),
                    None if dtype in (None, "") else str(dtype))
        metrics.REVIEW_VERDICTS.labels(verdict=str(verdict)).inc()
        app.state.on_labelled()
        return {"ok": True}

    @app.post("/api/items/{item_id}/skip")
    def skip(item_id: str, request: Request) -> dict[str, Any]:
        store.skip(check_item_id(item_id), operator(request))
        metrics.REVIEW_VERDICTS.labels(verdict="skip").inc()
        return {"ok": True}

    app.state.on_labelled = lambda: None  # the Kafka bridge wakes its outbox sender here
    return app
