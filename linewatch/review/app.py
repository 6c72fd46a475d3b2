"""The review page and its JSON API (FastAPI), for signed-in operators only.

Operators sign in with their own name and password (``linewatch operators add``),
so every claim and verdict is recorded under the person who made it, not under
a name anyone could type. Signing in creates a server-side session: the browser
gets a random session id in an HttpOnly, SameSite=Strict cookie (other sites
cannot submit verdicts with it), scripts get the same kind of token from
``POST /api/session`` and send ``Authorization: Bearer TOKEN``. Signing out
deletes the session, so a copied cookie stops working. Failed sign-ins are rate
limited per operator name and per client address (behind a reverse proxy every client
has the proxy's address: one client's failures then hold everyone back for the window).
Every other route answers 401 without a live session.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from collections import OrderedDict, deque
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from linewatch.review.store import DEFECT_TYPES, ReviewError, ReviewStore, check_item_id
from monitoring import metrics

log = logging.getLogger(__name__)

SESSION_COOKIE = "lw_session"


def _asset(name: str) -> str:
    return resources.files("linewatch.review").joinpath(name).read_text(encoding="utf-8")


class LoginLimiter:
    """At most ``max_failures`` failed sign-ins per ``window_s`` per key (operator name,
    client address); bounded to ``max_keys`` keys, the least recently failing forgotten."""

    def __init__(self, max_failures: int = 5, window_s: float = 300.0, max_keys: int = 10_000) -> None:
        self.max_failures, self.window_s, self.max_keys = max_failures, window_s, max_keys
        self._fails: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, *keys: str) -> float:
        """Seconds until these keys may try again (0 = now)."""
        now = time.monotonic()
        wait = 0.0
        with self._lock:
            for k in keys:
                q = self._fails.get(k)
                while q and now - q[0] > self.window_s:
                    q.popleft()
                if q and len(q) >= self.max_failures:
                    wait = max(wait, self.window_s - (now - q[0]))
        return wait

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            for k in keys:
                q = self._fails.setdefault(k, deque(maxlen=self.max_failures))
                q.append(now)
                self._fails.move_to_end(k)
            while len(self._fails) > self.max_keys:
                self._fails.popitem(last=False)


def create_app(store: ReviewStore, session_hours: float = 12.0,
               limiter: LoginLimiter | None = None) -> FastAPI:
    app = FastAPI(title="linewatch review", docs_url=None, redoc_url=None, openapi_url=None)
    page = _asset("page.html")
    login_form = _asset("login.html")
    limiter = limiter or LoginLimiter()
    ttl_s = session_hours * 3600
    for outcome in ("ok", "bad_credentials", "rate_limited"):
        metrics.REVIEW_LOGINS.labels(outcome=outcome)

    def login_page(error: str = "", status: int = 401) -> HTMLResponse:
        return HTMLResponse(login_form.replace("{error}", error), status_code=status)

    def token_of(request: Request) -> str:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return request.cookies.get(SESSION_COOKIE, "")

    def sign_in(request: Request, name: str, password: str) -> str | Response:
        """A session token, or the response that refuses it (401, or 429 when rate limited)."""
        keys = (f"op:{name.lower()}", f"ip:{request.client.host if request.client else '?'}")
        wait = limiter.retry_after(*keys)
        if wait > 0:
            metrics.REVIEW_LOGINS.labels(outcome="rate_limited").inc()
            return JSONResponse({"error": f"too many failed sign-ins; try again in {wait:.0f}s"},
                                status_code=429, headers={"Retry-After": str(int(wait) + 1)})
        if not store.check_password(name, password):
            limiter.failed(*keys)
            metrics.REVIEW_LOGINS.labels(outcome="bad_credentials").inc()
            log.warning("failed sign-in for operator %r from %s", name[:64], keys[1][3:])
            return JSONResponse({"error": "wrong operator name or password"}, status_code=401)
        metrics.REVIEW_LOGINS.labels(outcome="ok").inc()
        return store.create_session(name, ttl_s)

    @app.middleware("http")
    async def require_session(request: Request, call_next: Any) -> Response:
        if request.method == "POST" and request.url.path in ("/login", "/api/session"):
            return await call_next(request)
        operator = store.session_operator(token_of(request))
        if operator is None:
            if request.url.path.startswith("/api/") or request.method != "GET":
                return JSONResponse({"error": "sign in first (POST /api/session, or the page)"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return login_page()
        request.state.operator = operator
        return await call_next(request)

    @app.exception_handler(ReviewError)
    async def review_error(_request: Request, exc: ReviewError) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = urllib.parse.parse_qs((await request.body()).decode("utf-8", "replace"))
        name = (form.get("operator") or [""])[0].strip()
        # scrypt takes ~50 ms on purpose: off the event loop, so other operators are not held
        got = await run_in_threadpool(sign_in, request, name, (form.get("password") or [""])[0])
        if not isinstance(got, str):
            return login_page("Too many failed sign-ins: wait a few minutes." if got.status_code == 429
                              else "Wrong operator name or password.", got.status_code)
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(SESSION_COOKIE, got, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", max_age=int(ttl_s))
        return resp

    @app.post("/api/session")
    async def api_session(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not all(isinstance(body.get(k), str)
                                                 for k in ("operator", "password")):
            raise ReviewError(400, 'send JSON: {"operator": NAME, "password": PASSWORD}')
        got = await run_in_threadpool(sign_in, request, body["operator"], body["password"])
        if not isinstance(got, str):
            return got
        return JSONResponse({"token": got, "expires_in_s": int(ttl_s)})

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        store.end_session(token_of(request))  # the cookie's id is dead from now on
        resp = RedirectResponse("/", status_code=303)
        resp.delete_cookie(SESSION_COOKIE)
        return resp

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/-/healthy")
    async def healthy() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/queue")
    def queue(request: Request) -> dict[str, Any]:
        return {"counts": store.counts(), "waiting": store.waiting(),
                "operator": request.state.operator, "defect_types": list(DEFECT_TYPES)}

    def public(item: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in item.items() if not k.endswith("_jpeg")}
        quoted = urllib.parse.quote(item["item_id"], safe="")
        out["frame_url"] = f"/api/items/{quoted}/frame.jpg"
        out["overlay_url"] = f"/api/items/{quoted}/overlay.jpg"
        return out

    @app.post("/api/claim")
    def claim(request: Request) -> dict[str, Any]:
        c = store.claim_next(request.state.operator)
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
        store.label(check_item_id(item_id), request.state.operator, str(verdict),
                    None if dtype in (None, "") else str(dtype))
        metrics.REVIEW_VERDICTS.labels(verdict=str(verdict)).inc()
        app.state.on_labelled()
        return {"ok": True}

    @app.post("/api/items/{item_id}/skip")
    def skip(item_id: str, request: Request) -> dict[str, Any]:
        store.skip(check_item_id(item_id), request.state.operator)
        metrics.REVIEW_VERDICTS.labels(verdict="skip").inc()
        return {"ok": True}

    app.state.on_labelled = lambda: None  # the Kafka bridge wakes its outbox sender here
    return app
