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

Read-only: the queue is opened once (see `open_readonly`) and only read.
When the database is locked or unreachable, the API answers 503 with the
reason (password masked), the page shows it in a banner and keeps polling.
Nothing served holds a password or a path outside the runs folder
(runner.reporting.views.Redactor); job names in URLs must be known jobs.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from pathlib import Path

from db import DatabaseError, JobQueue, connect, mask_url

STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
REFRESH_SECONDS = 3.0
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
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
    """The queue and the caches shared by the requests (the ETA's attempt starts, the figure)."""

    def __init__(self, queue: JobQueue, url: str):
        self.queue, self.url = queue, url
        self.starts_cache: dict = {}
        self.figure: tuple[str | None, bytes | None] = (None, None)

    def snapshot(self):
        from runner.reporting.views import Redactor

        counts, jobs = self.queue.counts(), self.queue.jobs()
        return counts, jobs, Redactor(jobs)

    def status(self) -> dict:
        from runner.reporting.views import status_payload

        _, _, redactor = self.snapshot()
        return status_payload(self.queue, self.starts_cache, redactor)

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
        doc = status_payload(self.queue, self.starts_cache, redactor)
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


def make_app(dashboard: Dashboard, host: str = "127.0.0.1"):
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

    def database_error(request: Request, exc: Exception) -> Response:
        from runner.reporting.views import Redactor

        log.warning("database: %s", exc)
        return JSONResponse({"error": Redactor([]).text(str(exc)), "database": "unavailable"},
                            status_code=503, headers={"Cache-Control": "no-store",
                                                      "Retry-After": "3"})

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
    return Starlette(routes=routes,
                     middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)],
                     exception_handlers={DatabaseError: database_error,
                                         Exception: server_error})


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (port 0: any free port); OSError when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family = infos[0][0] if infos else family
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(infos[0][4] if infos else (host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(dashboard: Dashboard, sock: socket.socket, host: str) -> None:
    """Serve until Ctrl-C / SIGTERM (uvicorn handles both)."""
    import uvicorn

    config = uvicorn.Config(make_app(dashboard, host), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])
