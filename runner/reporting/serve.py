"""`python -m runner serve`: a read-only, live web dashboard of one queue.

A Starlette app served by uvicorn. The page (runner/reporting/static/) polls the JSON
API every few seconds and redraws in place:

    GET /                              the page
    GET /api/status                    = `status --json` (job folders relative to the runs folder)
    GET /api/results                   = `results --json`
    GET /api/latest                    newest evaluation and staleness of every job
    GET /api/jobs/<name>               one job: status row, config, metrics, events, log tail
    GET /api/info                      the queue (password masked), refresh interval
    GET /figures/sample_complexity.png runner.reporting.plot.sample_complexity of the results so far

Beyond loopback every request needs a token (`TokenGate`): in the URL
(`?token=...`, as printed), then in the cookie that sets, or as
`Authorization: Bearer ...`. On loopback a token is needed only when given.

Read-only: the queue is opened once (see `open_readonly`) and only read.
When the database is locked or unreachable, or a bucket holding job folders
cannot be read, the API answers 503 with the reason (password masked), the
page shows it in a banner and keeps polling.
Nothing served holds a password or a path outside the runs folder
(runner.reporting.views.Redactor); job names in URLs must be known jobs.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import logging
import secrets
import socket
from pathlib import Path
from urllib.parse import quote

from db import DatabaseError, JobQueue, connect, mask_url
from runner.bucket.s3 import BucketError

STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
REFRESH_SECONDS = 3.0
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ALL_INTERFACES = ("0.0.0.0", "::", "")
MIN_TOKEN_CHARS = 8
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

log = logging.getLogger("runner.reporting.serve")


def open_readonly(url: str) -> JobQueue:
    """The one place the dashboard opens the queue: read-only (nothing is ever created or
    migrated, every connection refuses writes; SQLite is opened afresh for each request)."""
    return JobQueue(connect(url, readonly=True))


class Dashboard:
    """The queue and the cache shared by the requests (the figure)."""

    def __init__(self, queue: JobQueue, url: str):
        self.queue, self.url = queue, url
        self.figure: tuple[str | None, bytes | None] = (None, None)

    def snapshot(self, configs: bool = True):
        """(counts, jobs, their Redactor); without `configs`, only the jobs' names and folders
        (what the redactor and a job's lookup need)."""
        from runner.reporting.views import Redactor

        columns = None if configs else ("name", "out_dir")
        counts, jobs = self.queue.counts(), self.queue.jobs(config=configs, columns=columns)
        return counts, jobs, Redactor(jobs)

    def status(self) -> dict:
        from runner.reporting.views import status_payload

        _, _, redactor = self.snapshot(configs=False)
        return status_payload(self.queue, redactor)

    def results(self) -> dict:
        from runner.reporting.results import aggregate
        from runner.reporting.views import results_payload

        _, jobs, redactor = self.snapshot()
        return results_payload(aggregate(jobs), redactor)

    def latest(self) -> dict:
        from runner.reporting.views import latest_payload

        return latest_payload(self.queue.jobs(), self.queue.workers())

    def job(self, name: str) -> dict | None:
        from runner.reporting.views import JOB_NAME, job_detail, status_payload

        if not JOB_NAME.fullmatch(name):
            return None
        counts, jobs, redactor = self.snapshot()
        job = next((j for j in jobs if j["name"] == name), None)
        if job is None:
            return None
        doc = status_payload(self.queue, redactor)
        row = next(r for r in doc["jobs"] if r["name"] == name)
        return job_detail(self.queue, job, row, redactor)

    def figure_png(self) -> bytes | None:
        """The sample-complexity figure, drawn again only when the results changed."""
        from runner.reporting.results import aggregate
        from runner.reporting.views import fingerprint, sample_complexity_png

        results = aggregate(self.queue.jobs())
        key = fingerprint(results.rows)
        if self.figure[0] != key:
            self.figure = (key, sample_complexity_png(results))
        return self.figure[1]

    def info(self) -> dict:
        return {"queue": self.queue_label(), "refresh_seconds": REFRESH_SECONDS}

    def queue_label(self) -> str:
        """The queue's URL, password masked; a SQLite file outside the runs folder shortened."""
        from sqlalchemy.engine import make_url

        from runner.reporting.views import Redactor

        url = make_url(self.url)
        if url.get_backend_name() == "sqlite" and url.database and url.database.startswith("/"):
            path = Redactor(self.queue.jobs()).text(url.database)
            return f"{url.drivername}:///{path}"
        return Redactor([]).text(mask_url(self.url))


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BindError(Exception):
    """The address cannot be listened on; the message says why in the user's terms."""


def new_token() -> str:
    return secrets.token_urlsafe(24)


def check_token(token: str) -> str | None:
    """Why a chosen token cannot be used, or None."""
    if len(token) < MIN_TOKEN_CHARS or token != token.strip():
        return (f"a token needs at least {MIN_TOKEN_CHARS} characters and no surrounding "
                "spaces (leave --token out for a generated one)")
    return None


def cookie_name(port: int) -> str:
    """One cookie per port: dashboards of two queues on one host keep their own tokens."""
    return f"runner_token_{port}"


class TokenGate:
    """ASGI middleware: a request without the token is answered 403.

    The token comes in the URL's `?token=` (then a cookie is set, so the page's
    own requests carry it), the cookie, or an `Authorization: Bearer` header;
    compared in constant time.
    """

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    def _matches(self, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.token)

    async def __call__(self, scope, receive, send):
        from starlette.requests import Request
        from starlette.responses import JSONResponse

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        port = (scope.get("server") or ("", 0))[1]
        in_url = request.query_params.get("token")
        bearer = request.headers.get("authorization", "")
        given = [in_url, request.cookies.get(cookie_name(port)),
                 bearer[7:] if bearer.lower().startswith("bearer ") else None]
        if not any(self._matches(g) for g in given):
            response = JSONResponse(
                {"error": "this dashboard needs its token: open the URL `serve` printed "
                          "(…/?token=…)"}, status_code=403,
                headers={"Cache-Control": "no-store", **SECURITY_HEADERS})
            await response(scope, receive, send)
            return
        if not self._matches(in_url):
            await self.app(scope, receive, send)
            return
        cookie = (f"{cookie_name(port)}={in_url}; Path=/; HttpOnly; SameSite=Strict").encode()

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"set-cookie", cookie)]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def make_app(dashboard: Dashboard, host: str = "127.0.0.1", token: str | None = None):
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    def json_response(doc, status: int = 200) -> Response:
        return Response(json.dumps(doc, indent=1), status_code=status,
                        media_type="application/json",
                        headers={"Cache-Control": "no-store", **SECURITY_HEADERS})

    def page(request: Request) -> Response:
        return Response((STATIC / "index.html").read_text(), media_type="text/html",
                        headers={"Cache-Control": "no-store", **SECURITY_HEADERS})

    def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES:  # a fixed list: nothing else on disk is reachable
            return json_response({"error": "not found"}, 404)
        return Response((STATIC / name).read_text(), media_type=STATIC_FILES[name],
                        headers={"Cache-Control": "no-cache", **SECURITY_HEADERS})

    def status(request: Request) -> Response:
        return json_response(dashboard.status())

    def results(request: Request) -> Response:
        return json_response(dashboard.results())

    def latest(request: Request) -> Response:
        return json_response(dashboard.latest())

    def info(request: Request) -> Response:
        return json_response(dashboard.info())

    def job(request: Request) -> Response:
        doc = dashboard.job(request.path_params["name"])
        if doc is None:
            return json_response({"error": "no such job"}, 404)
        return json_response(doc)

    def figure(request: Request) -> Response:
        png = dashboard.figure_png()
        if png is None:
            return json_response({"error": "no job has finished yet: no figure"}, 404)
        return Response(png, media_type="image/png",
                        headers={"Cache-Control": "no-store", **SECURITY_HEADERS})

    def unavailable(what: str):
        """A handler answering 503 with the reason: `what` (the database, a bucket) could not
        be read; the page shows it and keeps polling."""
        def handler(request: Request, exc: Exception) -> Response:
            from runner.reporting.views import Redactor

            log.warning("%s: %s", what, exc)
            return JSONResponse({"error": Redactor([]).text(str(exc)), what: "unavailable"},
                                status_code=503, headers={"Cache-Control": "no-store",
                                                          "Retry-After": "3"})
        return handler

    def server_error(request: Request, exc: Exception) -> Response:
        log.exception("%s failed", request.url.path)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    routes = [
        Route("/", page),
        Route("/static/{name}", static),
        Route("/api/status", status),
        Route("/api/results", results),
        Route("/api/latest", latest),
        Route("/api/info", info),
        Route("/api/jobs/{name:str}", job),
        Route("/figures/sample_complexity.png", figure),
    ]
    # Loopback only: refuse other Host headers, so a web page elsewhere cannot read the
    # dashboard through DNS rebinding.
    hosts = ["127.0.0.1", "localhost", "::1", "[::1]"] if is_loopback(host) else ["*"]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=hosts)]
    if token:
        middleware.append(Middleware(TokenGate, token=token))
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={DatabaseError: unavailable("database"),
                                         BucketError: unavailable("bucket"),
                                         Exception: server_error})


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (port 0: any free port); BindError says why it cannot be had."""
    where = f"cannot listen on {host}:{port}"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise BindError(f"{where}: the host name '{host}' cannot be resolved ({e.strerror}); "
                        "give an address of this machine: 127.0.0.1 (this machine only) or "
                        "0.0.0.0 (every interface)") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise BindError(f"{where}: {_bind_reason(e, host, port)}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _bind_reason(e: OSError, host: str, port: int) -> str:
    if e.errno == errno.EADDRINUSE:
        return f"port {port} is in use (choose another --port, or 0 for any free one)"
    if e.errno == errno.EADDRNOTAVAIL:
        return (f"{host} is not an address of this machine (give one of its addresses, "
                "127.0.0.1, or 0.0.0.0 for every interface)")
    if e.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges: choose another --port)"
    return e.strerror or str(e)


def urls(host: str, port: int, token: str | None) -> tuple[str, str | None]:
    """(the URL to open on this machine, the URL for other machines or None).

    A wildcard address (0.0.0.0, ::) is no place to browse to: this machine opens
    it through loopback, others through its host name.
    """
    query = f"?token={quote(token, safe='')}" if token else ""
    if host in ALL_INTERFACES:
        local = "[::1]" if host == "::" else "127.0.0.1"
        return (f"http://{local}:{port}/{query}",
                f"http://{socket.gethostname()}:{port}/{query}")
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/{query}", None


def serve(dashboard: Dashboard, sock: socket.socket, host: str, token: str | None) -> None:
    """Serve until Ctrl-C / SIGTERM (uvicorn handles both)."""
    import uvicorn

    config = uvicorn.Config(make_app(dashboard, host, token), log_level="warning",
                            access_log=False,
                            timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])
