"""A real headless browser for the tests: Debian's chromium, driven by selenium.

`.ci/run` installs `chromium` and `chromium-driver` (Debian packages) and the
`selenium` Python package (the `browser` extra). Where either is missing the
browser tests skip with the reason, except under CI=true, where they fail.
Selenium is pointed at both binaries, so it never downloads a browser or a
driver of its own.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests.support.skips import skip_or_fail

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)


def _find(names: tuple[str, ...], extra: tuple[str, ...] = ()) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return next((p for p in extra if Path(p).exists()), None)


def unavailable(reason: str):
    if os.environ.get("CI") == "true":
        reason += " (CI must run the browser tests: see .ci/run)"
    skip_or_fail(reason)


def chrome(offline: bool = False, width: int = 1400, height: int = 1000):
    """A headless chromium session; `offline`: every network request fails."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed: pip install -e '.[browser]'")
    binary = _find(BROWSERS)
    driver = _find(DRIVERS, ("/usr/lib/chromium/chromedriver",))
    if not binary or not driver:
        unavailable("no chromium/chromedriver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--hide-scrollbars",
                "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    if offline:
        # Every host resolves to nowhere, and the proxy is a closed port: nothing outside
        # the page itself can load.
        options.add_argument("--host-resolver-rules=MAP * ~NOTFOUND")
        options.add_argument("--proxy-server=http://127.0.0.1:9")
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager: never fetch anything
    session = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    session.set_page_load_timeout(60)
    if offline:
        # chromedriver's own network conditions, which it applies again to every page the
        # session opens: a bare CDP Network.emulateNetworkConditions lasts only until the
        # next navigation in chromium 150 (navigator.onLine reads true on the new page).
        session.set_network_conditions(offline=True, latency=0, throughput=0)
    return session


def keep_artifact(path: Path) -> None:
    """Copy a screenshot (or other file) to $RUNNER_TEST_ARTIFACTS when it is set."""
    folder = os.environ.get("RUNNER_TEST_ARTIFACTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(folder) / path.name)
