"""Check the built documentation site in a real headless browser.

The site built by ``mkdocs build`` is served over HTTP on ``127.0.0.1`` (as ``mkdocs serve`` would
serve it, so search and relative links behave as they do online) and opened in Chromium, driven by
Playwright. The checks:

* the entry page: its title names the project, Material's top tabs and sidebar navigation are
  rendered and visible, at least one image in the content has loaded, no image there is broken and
  no JavaScript error was raised; a full-page screenshot of it is saved;
* one notebook page: it shows a figure (an image that loaded, as a ``data:`` URI or a file);
* one API reference page: mkdocstrings rendered a heading for a documented name.

Requests to any host other than the local server are blocked, so the check runs offline and the
same everywhere. Every wait is bounded, and the whole browser session shares one time budget.

Usage::

    python .ci/check_site.py SITE_DIR --screenshot OUT.png

Needs only the standard library and ``playwright`` (``pip install playwright``), with a Chromium
installed by the system (``apt-get install chromium``); Playwright's own browser download is not
used. Prints one line per check and exits 0 when all pass, 1 when a check fails (the last line names
the failed checks), 2 when the check cannot run at all.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import os
import re
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

# What the site must show; change these when the navigation or the pages move.
EXPECTED_TITLE = "samfunc"
EXPECTED_TABS = ("Home", "Guides", "Notebooks", "Results", "API reference")
HOME_PATH = "/"
NOTEBOOK_PATH = "/notebooks/01_quickstart/"
REFERENCE_PATH = "/reference/gradients/"
REFERENCE_NAME = "sam_grad"  # a heading must hold this name as a whole identifier

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
# Wide enough for Material's tabs and sidebar, which it shows from 76.25em (1220 px) up.
VIEWPORT = {"width": 1400, "height": 900}

TOTAL_BUDGET_S = 40.0  # the whole browser session, launch to last check
WATCHDOG_S = TOTAL_BUDGET_S + 5.0  # ends the script if a call without a timeout hangs
LAUNCH_TIMEOUT_S = 30.0
NAVIGATION_TIMEOUT_S = 20.0
WAIT_TIMEOUT_S = 5.0  # for an element of a loaded page to be visible
IMAGE_TIMEOUT_S = 10.0  # for the images of a page to finish loading
SCREENSHOT_TIMEOUT_S = 15.0

CONTENT_IMAGES = ".md-content img"
REFERENCE_HEADINGS = ".md-content article :is(h1, h2, h3, h4, h5, h6)"

# Each <img> in the content, as plain data; lazy images are made eager so that all of them load.
IMAGES_JS = """(selector) => Array.from(document.querySelectorAll(selector), (img) => {
    if (img.loading === "lazy") img.loading = "eager";
    return {src: img.currentSrc || img.src || "", complete: img.complete,
            width: img.naturalWidth, height: img.naturalHeight};
})"""
IMAGES_SETTLED_JS = """(selector) => Array.from(document.querySelectorAll(selector))
    .every((img) => img.complete)"""


class CheckFailed(Exception):
    """A check found the site not as it should be; the message says what was wrong."""


class Deadline:
    """The time budget that every wait of the browser session draws on.

    Args:
        seconds: Length of the budget, from now.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def ms(self, cap_s: float) -> float:
        """Returns a timeout in milliseconds: ``cap_s``, or what is left of the budget if less.

        Args:
            cap_s: The longest this wait may take, in seconds.

        Raises:
            CheckFailed: The budget is spent.
        """
        left = self.end - time.monotonic()
        if left <= 0.5:
            raise CheckFailed(f"the time budget of {self.seconds:.0f} s is spent")
        return min(cap_s, left) * 1000.0


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the site's files without logging each request."""

    def log_message(self, format: str, *args: Any) -> None:
        """Drops the request log line."""


class QuietServer(http.server.ThreadingHTTPServer):
    """A threading HTTP server that does not print a traceback when a client hangs up."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignores connections the browser dropped; reports any other error as usual.

        Args:
            request: The request being handled.
            client_address: The client's address.
        """
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class Report:
    """Runs the checks, prints one line for each and keeps the names of those that failed."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []
        self.running = "setup"  # the check under way, named if the watchdog fires

    def check(self, name: str, run: Callable[[], str]) -> bool:
        """Runs one check and prints its outcome.

        Args:
            name: The check's name, as printed.
            run: Does the check; returns what passed, or raises `CheckFailed` (or a Playwright
                error, such as a timeout) saying what did not.

        Returns:
            Whether the check passed.
        """
        self.running = name
        try:
            detail = run()
        except Exception as error:  # a timeout or a crash fails this check, not the whole run
            message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            if not isinstance(error, CheckFailed):
                message = f"{type(error).__name__}: {message}"
            print(f"FAIL  {name}: {message}", flush=True)
            self.failed.append(name)
            return False
        print(f"ok    {name}: {detail}", flush=True)
        self.passed += 1
        return True

    def skip(self, name: str, reason: str) -> None:
        """Records a check that could not run because an earlier one failed.

        Args:
            name: The check's name.
            reason: Why it did not run.
        """
        print(f"FAIL  {name}: not run, {reason}", flush=True)
        self.failed.append(name)


def png_size(path: Path) -> tuple[int, int]:
    """Returns the width and height of a PNG file, read from its header.

    Args:
        path: The PNG file.
    """
    header = path.read_bytes()[:24]
    if header[:8] != b"\x89PNG\r\n\x1a\n":
        raise CheckFailed(f"{path} is not a PNG file")
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def clean(text: str) -> str:
    """Returns a heading's text on one line, without the permalink sign.

    Args:
        text: The text, as the browser renders it.
    """
    return " ".join(text.replace("\u00b6", "").split())


def wait_visible(locator: Any, what: str, deadline: Deadline) -> Any:
    """Waits (bounded) until the first element a locator matches is visible.

    Args:
        locator: The Playwright locator.
        what: What the element is, for the message.
        deadline: The session's time budget.

    Returns:
        The locator of that first element.

    Raises:
        CheckFailed: No such element became visible in time; says whether there is one at all.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    timeout = deadline.ms(WAIT_TIMEOUT_S)
    try:
        locator.first.wait_for(state="visible", timeout=timeout)
    except PlaywrightTimeout:
        count = locator.count()
        state = "is not on the page" if count == 0 else f"is on the page ({count}x) but hidden"
        raise CheckFailed(f"{what} {state} (waited {timeout / 1000:.0f} s)") from None
    return locator.first


def describe(image: dict[str, Any]) -> str:
    """Names an image briefly: its file name, or the kind of its ``data:`` URI.

    Args:
        image: One image, as returned by ``IMAGES_JS``.
    """
    src = str(image["src"])
    if src.startswith("data:"):
        return f"data:{src[5:].split(';', 1)[0].split(',', 1)[0]} URI"
    return urlsplit(src).path or src


def page_images(page: Any, deadline: Deadline) -> list[dict[str, Any]]:
    """Waits (bounded) until the content's images have loaded or failed, then describes them.

    Args:
        page: The Playwright page.
        deadline: The session's time budget.

    Returns:
        One dict per ``<img>`` in the content: ``src``, ``complete``, ``width``, ``height``
        (natural size; 0 for an image that did not load).
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.evaluate(IMAGES_JS, CONTENT_IMAGES)  # makes lazy images eager
    with contextlib.suppress(PlaywrightTimeout):  # still loading: the checks below say which
        page.wait_for_function(
            IMAGES_SETTLED_JS, arg=CONTENT_IMAGES, timeout=deadline.ms(IMAGE_TIMEOUT_S)
        )
    return list(page.evaluate(IMAGES_JS, CONTENT_IMAGES))


def require_loaded_image(images: list[dict[str, Any]], what: str) -> str:
    """Checks that at least one image loaded (a file or a ``data:`` URI) and that none is broken.

    Args:
        images: The page's content images, from `page_images`.
        what: What the image is, for the messages (``"image"``, ``"figure"``).

    Returns:
        What passed: the loaded images with their sizes.

    Raises:
        CheckFailed: No image loaded, or one is broken.
    """
    loaded = [i for i in images if i["complete"] and i["width"] > 0]
    broken = [i for i in images if i["complete"] and i["width"] == 0]
    pending = [i for i in images if not i["complete"]]
    if broken:
        names = ", ".join(describe(i) for i in broken)
        raise CheckFailed(f"{len(broken)} of {len(images)} <img> broken (naturalWidth 0): {names}")
    if not loaded:
        if not images:
            raise CheckFailed(f"no <img> in the content ({CONTENT_IMAGES!r} matched nothing)")
        names = ", ".join(describe(i) for i in pending)
        raise CheckFailed(f"no {what} loaded: {len(images)} <img> still loading: {names}")
    sizes = ", ".join(f"{describe(i)} {i['width']}x{i['height']}" for i in loaded[:4])
    more = f" and {len(loaded) - 4} more" if len(loaded) > 4 else ""
    note = f"; {len(pending)} still loading" if pending else ""
    return f"{len(loaded)} of {len(images)} <img> loaded: {sizes}{more}{note}"


def check_site(site_dir: Path, screenshot: Path, chromium: str) -> int:
    """Serves the site, opens its pages in Chromium and runs every check.

    Args:
        site_dir: The built site (the directory that holds ``index.html``).
        screenshot: Where to save the full-page screenshot of the entry page.
        chromium: The Chromium executable.

    Returns:
        The exit status: 0 when every check passed, 1 otherwise.
    """
    from playwright.sync_api import sync_playwright

    started = time.monotonic()
    report = Report()
    handler = functools.partial(QuietHandler, directory=str(site_dir))
    server = QuietServer(("127.0.0.1", 0), handler)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="site-server", daemon=True)
    thread.start()
    print(f"ok    server: {site_dir} at {base}/", flush=True)

    def give_up() -> None:  # in the watchdog's thread; the browser dies with its driver
        print(
            f"FAIL  {report.running}: still running after {WATCHDOG_S:.0f} s (a page hangs?)\n"
            f"check_site: FAILED, the browser session did not finish within {WATCHDOG_S:.0f} s "
            f"({report.passed} passed; failed before: {', '.join(report.failed) or 'none'})",
            flush=True,
        )
        os._exit(1)

    watchdog = threading.Timer(WATCHDOG_S, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        with sync_playwright() as playwright:
            deadline = Deadline(TOTAL_BUDGET_S)
            launched = time.monotonic()
            try:
                browser = playwright.chromium.launch(
                    executable_path=chromium,
                    headless=True,
                    args=list(CHROMIUM_ARGS),
                    timeout=deadline.ms(LAUNCH_TIMEOUT_S),
                )
            except Exception as error:  # Playwright's message holds the browser's log
                print(f"FAIL  browser: {chromium} did not start: {error}", flush=True)
                report.failed.append("browser")
            else:
                try:
                    print(
                        f"ok    browser: Chromium {browser.version} started in "
                        f"{time.monotonic() - launched:.1f} s",
                        flush=True,
                    )
                    run_checks(browser, base, screenshot, deadline, report)
                finally:
                    browser.close()
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    elapsed = time.monotonic() - started
    if report.failed:
        print(
            f"check_site: FAILED {len(report.failed)} check(s): {', '.join(report.failed)} "
            f"({report.passed} passed, {elapsed:.1f} s)",
            flush=True,
        )
        return 1
    print(f"check_site: all {report.passed} checks passed in {elapsed:.1f} s", flush=True)
    return 0


def run_checks(
    browser: Any, base: str, screenshot: Path, deadline: Deadline, report: Report
) -> None:
    """Runs the checks of the three pages in one browser context.

    Args:
        browser: The launched Playwright browser.
        base: The served site's URL, without a trailing slash.
        screenshot: Where to save the entry page's screenshot.
        deadline: The session's time budget.
        report: Collects the outcomes.
    """
    context = browser.new_context(viewport=VIEWPORT)
    blocked: list[str] = []

    def local_only(route: Any) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort("blockedbyclient")

    context.route("**/*", local_only)
    try:
        check_home(context, base, screenshot, deadline, report)
        check_notebook(context, base, deadline, report)
        check_reference(context, base, deadline, report)
    finally:
        context.close()
    if blocked:
        hosts = sorted({urlsplit(url).hostname or url for url in blocked})
        print(
            f"note  {len(blocked)} request(s) off the site blocked: {', '.join(hosts)}", flush=True
        )


def open_page(
    context: Any, base: str, path: str, deadline: Deadline, report: Report
) -> Optional[tuple[Any, list[str]]]:
    """Opens one page of the site, collecting its JavaScript errors.

    Args:
        context: The Playwright browser context.
        base: The served site's URL.
        path: The page's path on the site.
        deadline: The session's time budget.
        report: Collects the outcome of loading the page.

    Returns:
        The page and the list its JavaScript errors are collected in (``pageerror`` events),
        or None if the page did not load.
    """
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error).strip().splitlines()[0]))

    def load() -> str:
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        started = time.monotonic()
        response = page.goto(
            base + path, wait_until="domcontentloaded", timeout=deadline.ms(NAVIGATION_TIMEOUT_S)
        )
        if response is None or response.status != 200:
            status = "no response" if response is None else f"HTTP {response.status}"
            raise CheckFailed(f"{path} answered {status}")
        parsed = time.monotonic() - started
        try:  # the load event waits for images too: one that hangs is the image checks' to report
            page.wait_for_load_state("load", timeout=deadline.ms(IMAGE_TIMEOUT_S))
        except PlaywrightTimeout:
            return f"{path} parsed in {parsed:.2f} s, but its load event has not fired"
        return f"{path} loaded in {time.monotonic() - started:.2f} s"

    if not report.check(f"load {path}", load):
        page.close()
        return None
    return page, errors


def check_no_errors(page: Any, errors: list[str]) -> str:
    """Checks that no JavaScript error was reported on the page.

    Args:
        page: A page opened by `open_page`.
        errors: The page's JavaScript errors, collected by `open_page`.

    Returns:
        What passed.

    Raises:
        CheckFailed: The page reported errors; the message quotes the first ones.
    """
    page.wait_for_timeout(200)  # lets errors of late scripts arrive
    if errors:
        raise CheckFailed(f"{len(errors)} JavaScript error(s): " + " | ".join(errors[:3]))
    return "no JavaScript errors (pageerror)"


def check_home(
    context: Any, base: str, screenshot: Path, deadline: Deadline, report: Report
) -> None:
    """Checks the entry page and saves its full-page screenshot.

    Args:
        context: The Playwright browser context.
        base: The served site's URL.
        screenshot: Where to save the screenshot.
        deadline: The session's time budget.
        report: Collects the outcomes.
    """

    def title(page: Any) -> str:
        text = page.title()
        if EXPECTED_TITLE not in text:
            raise CheckFailed(f"title {text!r} does not contain {EXPECTED_TITLE!r}")
        return f"title {text!r} contains {EXPECTED_TITLE!r}"

    def tabs(page: Any) -> str:
        nav = wait_visible(page.locator("nav.md-tabs"), "nav.md-tabs", deadline)
        links = nav.locator(".md-tabs__link")
        labels = [text.strip() for text in links.all_inner_texts()]
        missing = [label for label in EXPECTED_TABS if label not in labels]
        if missing:
            raise CheckFailed(f"tabs {labels} lack {missing}")
        hidden = [labels[i] for i in range(len(labels)) if not links.nth(i).is_visible()]
        hidden = [label for label in hidden if label in EXPECTED_TABS]
        if hidden:
            raise CheckFailed(f"tabs {hidden} are not visible")
        box = nav.bounding_box() or {"width": 0, "height": 0}
        return f"nav.md-tabs visible ({box['width']:.0f}x{box['height']:.0f} px): {labels}"

    def sidebar(page: Any) -> str:
        selector = ".md-sidebar--primary nav.md-nav--primary"
        nav = wait_visible(page.locator(selector), selector, deadline)
        links = nav.locator("a.md-nav__link")
        visible = [i for i in range(links.count()) if links.nth(i).is_visible()]
        if not visible:
            raise CheckFailed("the sidebar navigation shows no link")
        box = nav.bounding_box() or {"width": 0, "height": 0}
        return (
            f"sidebar navigation visible ({box['width']:.0f}x{box['height']:.0f} px), "
            f"{len(visible)} links shown of {links.count()}"
        )

    def image(page: Any) -> str:
        return require_loaded_image(page_images(page, deadline), "image")

    def save_screenshot(page: Any) -> str:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(
            path=str(screenshot), full_page=True, timeout=deadline.ms(SCREENSHOT_TIMEOUT_S)
        )
        width, height = png_size(screenshot)
        return f"full page saved to {screenshot} ({width}x{height} px)"

    checks = {"title": title, "tabs": tabs, "sidebar": sidebar, "image": image}
    last = {"screenshot": save_screenshot}  # also when a check failed: it shows why
    check_page(context, base, HOME_PATH, "home", checks, deadline, report, last=last)


def check_page(
    context: Any,
    base: str,
    path: str,
    label: str,
    checks: dict[str, Callable[[Any], str]],
    deadline: Deadline,
    report: Report,
    last: Optional[dict[str, Callable[[Any], str]]] = None,
) -> None:
    """Opens one page, runs ``checks``, checks it raised no JavaScript error, then runs ``last``.

    Args:
        context: The Playwright browser context.
        base: The served site's URL.
        path: The page's path on the site.
        label: The page's name in the report ("home", "notebook", "reference").
        checks: Each check's name and a function of the page that returns what passed.
        deadline: The session's time budget.
        report: Collects the outcomes.
        last: Checks like ``checks`` that run after the JavaScript check.
    """
    last = last or {}
    opened = open_page(context, base, path, deadline, report)
    if opened is None:
        for name in (*checks, "JavaScript", *last):
            report.skip(f"{label} {name}", f"{path} did not load")
        return
    page, errors = opened
    for name, check in checks.items():
        report.check(f"{label} {name}", functools.partial(check, page))
    report.check(f"{label} JavaScript", lambda: check_no_errors(page, errors))
    for name, check in last.items():
        report.check(f"{label} {name}", functools.partial(check, page))
    page.close()


def check_notebook(context: Any, base: str, deadline: Deadline, report: Report) -> None:
    """Checks that the notebook page shows a figure (see ``check_page`` for the arguments)."""

    def figure(page: Any) -> str:
        return require_loaded_image(page_images(page, deadline), "figure")

    check_page(context, base, NOTEBOOK_PATH, "notebook", {"figure": figure}, deadline, report)


def check_reference(context: Any, base: str, deadline: Deadline, report: Report) -> None:
    """Checks the reference page's heading for ``REFERENCE_NAME`` (arguments: ``check_page``)."""

    def heading(page: Any) -> str:
        name = re.compile(rf"(?<!\w){re.escape(REFERENCE_NAME)}(?!\w)")
        headings = page.locator(REFERENCE_HEADINGS).filter(has_text=name)
        try:
            first = wait_visible(headings, f"a heading with {REFERENCE_NAME!r}", deadline)
        except CheckFailed as error:
            found = [clean(t) for t in page.locator(REFERENCE_HEADINGS).all_inner_texts()]
            raise CheckFailed(f"{error}; the page's headings: {found[:6]}") from None
        tag = first.evaluate("(element) => element.tagName.toLowerCase()")
        text = clean(first.inner_text())
        return f"<{tag}> {text!r} ({headings.count()} heading(s) hold {REFERENCE_NAME!r})"

    check_page(context, base, REFERENCE_PATH, "reference", {"heading": heading}, deadline, report)


def main(argv: Optional[list[str]] = None) -> int:
    """Parses the command line and runs the check.

    Args:
        argv: The arguments, without the program name; ``sys.argv[1:]`` when None.

    Returns:
        The exit status: 0 when all checks pass, 1 when one fails, 2 when the check cannot run.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site_dir", type=Path, help="the built site (holds index.html)")
    parser.add_argument(
        "--screenshot", type=Path, required=True, help="where to save the entry page's PNG"
    )
    parser.add_argument("--chromium", default=CHROMIUM, help=f"the browser (default {CHROMIUM})")
    args = parser.parse_args(argv)

    if not (args.site_dir / "index.html").is_file():
        print(f"check_site: cannot run: {args.site_dir}/index.html does not exist", flush=True)
        return 2
    if not Path(args.chromium).is_file():
        print(f"check_site: cannot run: no browser at {args.chromium}", flush=True)
        return 2
    try:
        import playwright  # noqa: F401 (only checks that it is installed)
    except ImportError:
        print("check_site: cannot run: playwright is not installed (pip install playwright)")
        return 2
    try:
        return check_site(args.site_dir.resolve(), args.screenshot, args.chromium)
    except Exception as error:  # the driver or the browser died under Playwright
        print(f"check_site: FAILED, the browser session broke off: {error}", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
