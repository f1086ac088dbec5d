"""`serve` beyond loopback: a token guards every request; hosts and URLs said as they are.

Real server processes over a planned SQLite queue: bound to every interface
(0.0.0.0) and reached at 127.0.0.1, or on loopback with a chosen token; requests
without the token must get 403, with it 200. The page in headless chromium keeps
the token it was opened with for its own API calls.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import urllib.error
import urllib.request

import pytest

from tests.support.browser import chrome
from tests.support.commands import PYTHON, ROOT, cli, refused_line, runner_env
from tests.support.serve import stop_server
from tests.support.waiting import wait_for

PATHS = ["", "static/app.js", "api/status", "api/results", "api/latest", "api/info",
         "api/jobs/table_connectivity_standard_V5_N256_run1", "figures/sample_complexity.png"]


@pytest.fixture(scope="module")
def queue_url(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("access")
    url = f"sqlite:///{folder / 'queue.sqlite'}"
    plan = cli(url, "plan", "--profile", "smoke", "--only", "V=5", "--only", "N=256",
               "--out-root", str(folder / "runs"))
    assert plan.returncode == 0, plan.stderr
    return url


def serve(url: str, *args: str, env: dict | None = None):
    """`serve --port 0 ARGS`: (process, the stdout lines it printed first, port)."""
    proc = subprocess.Popen([PYTHON, "-m", "runner", "serve", "--port", "0", *args], cwd=ROOT,
                            env=env or runner_env(url), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read():
        lines.append(proc.stdout.readline())
        if "0.0.0.0" in args:
            lines.append(proc.stdout.readline())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(60)
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", lines[0] if lines else "")
    if not match:
        proc.kill()
        raise AssertionError(f"serve did not start: {lines} {proc.stderr.read()[-2000:]}")
    return proc, [line.rstrip("\n") for line in lines], int(match.group(1))


def request(port: int, path: str, headers: dict | None = None):
    """(status, headers, body) of GET http://127.0.0.1:PORT/PATH."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_a_host_name_that_cannot_be_resolved_is_named_as_such(queue_url):
    line = refused_line(cli(queue_url, "serve", "--host", "nosuchhost.invalid"))
    assert line.startswith("error: cannot listen on nosuchhost.invalid:8765: the host name "
                           "'nosuchhost.invalid' cannot be resolved ("), line
    assert line.endswith("); give an address of this machine: 127.0.0.1 (this machine only) "
                         "or 0.0.0.0 (every interface)"), line
    assert "--port" not in line


def test_every_interface_needs_the_generated_token_and_the_printed_url_works(queue_url):
    proc, lines, port = serve(queue_url, "--host", "0.0.0.0")
    try:
        token = re.fullmatch(rf"dashboard of sqlite:///\S+: http://127\.0\.0\.1:{port}/"
                             r"\?token=([\w-]{32})  \(Ctrl-C to stop\)", lines[0]).group(1)
        assert lines[1] == (f"listening on all interfaces (0.0.0.0); from another machine: "
                            f"http://{socket.gethostname()}:{port}/?token={token}")
        for path in PATHS:   # nothing is served without the token
            status, _, body = request(port, path)
            assert status == 403, (path, status)
            assert "needs its token" in json.loads(body)["error"]
        assert request(port, "api/info?token=wrong-token-0123")[0] == 403
        assert request(port, "api/info", {"Authorization": "Bearer nope"})[0] == 403

        status, headers, body = request(port, f"?token={token}")   # the printed URL
        assert status == 200 and b"Sweep dashboard" in body
        cookie = headers["Set-Cookie"]
        assert cookie == (f"runner_token_{port}={token}; Path=/; HttpOnly; SameSite=Strict")
        with_cookie = {"Cookie": cookie.split(";")[0]}
        for path in PATHS[:-1]:
            assert request(port, path, with_cookie)[0] == 200, path
        assert request(port, "api/status", {"Authorization": f"Bearer {token}"})[0] == 200
        assert request(port, "api/status", {"Cookie": f"runner_token_{port}=x{token}"})[0] == 403
    finally:
        stop_server(proc)
    note = proc.stderr.read()
    assert "note: listening beyond loopback: every request needs the token (a new one, " \
           "generated now; choose one with --token or $RUNNER_SERVE_TOKEN)" in note


def test_a_chosen_token_is_required_on_loopback_too(queue_url):
    token = "correct-horse-battery"
    proc, lines, port = serve(queue_url, env={**runner_env(queue_url),
                                              "RUNNER_SERVE_TOKEN": token})
    try:
        assert f"http://127.0.0.1:{port}/?token={token}  (Ctrl-C to stop)" in lines[0]
        assert request(port, "api/status")[0] == 403
        assert request(port, "api/status", {"Authorization": f"Bearer {token}"})[0] == 200
    finally:
        stop_server(proc)
    assert "note:" not in proc.stderr.read()   # loopback: nothing to warn about
    plain, _, port = serve(queue_url)   # no token given: loopback is open as before
    try:
        assert request(port, "api/status")[0] == 200
    finally:
        stop_server(plain)


TEST_HOST = "10.231.7.1"   # an address of the test's own network namespace


@pytest.fixture
def lan_namespace():
    """A network namespace of this test's own with a LAN-like address: a specific,
    non-loopback, non-wildcard host to bind (root, iproute2). The address sits on the
    namespace's own `lo` (no dummy or veth driver needed); traffic never leaves it.
    Skipped where one cannot be made, except under CI=true: failed."""
    name = f"runner-serve-{os.getpid()}"

    def ip(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", *args], capture_output=True, text=True)

    made = ip("netns", "add", name)
    if made.returncode != 0:
        reason = f"cannot create a network namespace here (ip netns add: {made.stderr.strip()})"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        for step in (["ip", "link", "set", "lo", "up"],
                     ["ip", "addr", "add", f"{TEST_HOST}/32", "dev", "lo"]):
            done = ip("netns", "exec", name, *step)
            assert done.returncode == 0, (step, done.stderr)
        yield name
    finally:
        ip("netns", "del", name)


def test_a_specific_lan_address_needs_the_generated_token(queue_url, lan_namespace):
    """Not only wildcard hosts: a dashboard bound to one LAN address is reachable from the
    network, so it runs with a generated token too."""
    inside = ["ip", "netns", "exec", lan_namespace]
    proc = subprocess.Popen([*inside, PYTHON, "-m", "runner", "serve", "--host", TEST_HOST,
                             "--port", "0"], cwd=ROOT, env=runner_env(queue_url),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        match = re.fullmatch(rf"dashboard of sqlite:///\S+: http://{re.escape(TEST_HOST)}:"
                             r"(\d+)/\?token=([\w-]{32})  \(Ctrl-C to stop\)\n", first)
        assert match, (first, proc.stderr.read() if proc.poll() is not None else "")
        port, token = match.groups()

        def status(query: str) -> str:
            code = ("import sys, urllib.request, urllib.error\n"
                    "try:\n    print(urllib.request.urlopen(sys.argv[1], timeout=30).status)\n"
                    "except urllib.error.HTTPError as e:\n    print(e.code)\n")
            return subprocess.run([*inside, PYTHON, "-c", code,
                                   f"http://{TEST_HOST}:{port}/api/status{query}"],
                                  capture_output=True, text=True, timeout=60).stdout.strip()

        assert status("") == "403"
        assert status("?token=wrong-token-0123") == "403"
        assert status(f"?token={token}") == "200"
    finally:
        stop_server(proc)
    assert "note: listening beyond loopback: every request needs the token (a new one, " \
           "generated now" in proc.stderr.read()


def test_a_weak_token_is_refused(queue_url):
    line = refused_line(cli(queue_url, "serve", "--host", "0.0.0.0", "--token", "short"))
    assert line == ("error: --token / $RUNNER_SERVE_TOKEN: a token needs at least 8 characters "
                    "and no surrounding spaces (leave --token out for a generated one)")


def test_the_page_opened_with_its_token_reads_the_api(queue_url):
    proc, lines, port = serve(queue_url, "--host", "0.0.0.0")
    driver = chrome()
    try:
        printed = re.search(r"http://\S+", lines[0]).group(0)
        driver.get(printed)
        wait_for(lambda: driver.execute_script(
            "return document.querySelectorAll('#jobs tbody tr').length") == 6, 30,
            "the jobs, read through the API with the token's cookie")
        assert not driver.find_element("id", "banner").is_displayed()
        # a fresh browser without the token gets nothing
        driver.delete_all_cookies()
        driver.get(f"http://127.0.0.1:{port}/")
        assert "needs its token" in driver.find_element("tag name", "body").text
    finally:
        driver.quit()
        stop_server(proc)
