"""The web console in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright,
against real processes (nats-server, recorder, broker, a worker, the console).

One scenario, as a person would watch: a worker with its slots, a session open, a running activity's
progress advancing and its messages streaming in; Cancel with a reason ends it ``cancelled`` with
that reason; a malformed event shows up under Dead letters; a worker killed with SIGKILL turns its
session ``failed`` (``worker_lost``). Every wait is one of Playwright's waiting assertions.

Screenshots of each page go to a temporary directory, or to ``$CADENZA_SCREENSHOTS`` (the checked-in
ones: ``CADENZA_SCREENSHOTS=docs/console pytest tests/test_console_browser.py``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import bus
from bus.testing import ExternalServer, ServiceProcess, eventually, unique_prefix
from bus.transport._server import EmbeddedServer

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Playwright's waiting assertions: generous, the CI box is a loaded 2-core machine.
WAIT = 30_000

playwright_api = pytest.importorskip(
    "playwright.async_api", reason="playwright is not installed: pip install -e '.[test]'"
)
pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) or shutil.which("chromium")),
    reason=f"no Chromium at {CHROMIUM}: install Debian's chromium package (apt-get install chromium); .ci/run does",
)


@contextlib.contextmanager
def services(url: str, prefix: str) -> Iterator[dict[str, ServiceProcess]]:
    """recorder, broker, worker and console as real processes (started from this thread)."""
    specs = {
        "recorder": ("services.recorder", "--sweep-interval", "0.2"),
        "broker": ("services.broker",),
        "worker": ("tests.console_worker", "--tasklist", "console", "--heartbeat-interval", "0.25"),
        "console": ("services.console", "--port", "0"),
    }
    procs: dict[str, ServiceProcess] = {}
    try:
        for name, (module, *args) in specs.items():
            marker = "console on" if name == "console" else "cadenza: ready"
            procs[name] = ServiceProcess(module, *args, "--prefix", prefix, url=url, ready_marker=marker).start(60)
        yield procs
    finally:
        for proc in reversed(procs.values()):
            proc.stop()


async def test_the_console_shows_live_work_and_cancels_it_in_a_browser(
    nats_server: EmbeddedServer | ExternalServer, tmp_path: Path
) -> None:
    expect = playwright_api.expect
    shots = Path(os.environ.get("CADENZA_SCREENSHOTS") or tmp_path)
    await anyio.Path(shots).mkdir(parents=True, exist_ok=True)
    prefix = unique_prefix("ui")
    with services(nats_server.url, prefix) as procs:
        console = re.search(r"console on (http://\S+?)/?(\s|$)", procs["console"].ready_line)
        assert console is not None, procs["console"].ready_line
        base = console.group(1)
        worker_id = procs["worker"].ready_line.split("worker ", 1)[1].split()[0]
        async with (
            bus.connect(nats_server.url, prefix=prefix, name="browser-test") as b,
            anyio.create_task_group() as tg,
        ):
            options = bus.SessionOptions(
                tasklist="console", heartbeat_timeout=1.5, creation_timeout=20, execution_timeout=600
            )
            ctx = await bus.create_session(b.context(), options)
            info = bus.get_session_info(ctx)
            assert info is not None
            for name in ("intro", "titles", "credits"):  # a few finished ones, so the lists are not bare
                await bus.execute_activity(ctx, "render", name, kwargs={"frames": 4, "delay": 0.02})
            aid = "browser-render-1"
            outcome: list[BaseException] = []

            async def run() -> None:
                try:
                    await bus.execute_activity(
                        ctx,
                        "render",
                        "feature",
                        kwargs={"frames": 3000, "delay": 0.1},
                        activity_id=aid,
                        start_to_close_timeout=300,
                    )
                except bus.CadenzaError as exc:
                    outcome.append(exc)

            tg.start_soon(run)
            async with playwright_api.async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
                try:
                    page = await browser.new_page(viewport={"width": 1280, "height": 800})
                    errors: list[str] = []
                    page.on("pageerror", lambda exc: errors.append(str(exc)))

                    # Workers: the worker with one slot of four in use.
                    await page.goto(f"{base}/workers")
                    row = page.locator(f'tr[data-id="{worker_id}"]')
                    await expect(row.locator(".slot-count")).to_have_text("1 / 4", timeout=WAIT)
                    await expect(row.locator(".badge")).to_have_text("live", timeout=WAIT)
                    try:
                        await expect(row.locator(".chip")).to_have_text("render", timeout=WAIT)
                    except AssertionError as exc:  # say what the console's API held, to tell a slow cache from a bug
                        held = [await (await page.request.get(f"{base}{path}")).text()
                                for path in ("/api/workers", f"/api/activities/{aid}")]  # fmt: skip
                        raise AssertionError(f"{exc}\nthe console's API: {held}") from None
                    await page.screenshot(path=shots / "workers.png")

                    # Sessions: ours is open.
                    await page.goto(f"{base}/sessions")
                    await expect(page.locator(f'tr[data-id="{info.session_id}"] .badge')).to_have_text(
                        "open", timeout=WAIT
                    )
                    await page.screenshot(path=shots / "sessions.png")

                    # Activities: the running one first; open it.
                    await page.goto(f"{base}/activities")
                    link = page.locator(f'tr[data-id="{aid}"] a')
                    await expect(page.locator(f'tr[data-id="{aid}"] .badge')).to_have_text("running", timeout=WAIT)
                    await expect(page.locator("#activities tbody tr")).to_have_count(4, timeout=WAIT)
                    await page.screenshot(path=shots / "activities.png")
                    await link.click()
                    await expect(page).to_have_url(f"{base}/activities/{aid}", timeout=WAIT)

                    # Its progress advances and its messages stream in, without a reload.
                    bar = page.locator("#activity-head .progress")
                    await expect(bar).not_to_have_attribute("data-value", "0", timeout=WAIT)
                    before = await bar.get_attribute("data-value")
                    await expect(bar).not_to_have_attribute("data-value", before or "0", timeout=WAIT)
                    await expect(page.locator('#messages .msg[data-seq="3"]')).to_be_visible(timeout=WAIT)
                    seen = await page.locator("#messages .msg").count()
                    await expect(page.locator(f'#messages .msg[data-seq="{seen + 3}"]')).to_contain_text(
                        f"feature: frame {seen + 3}/3000", timeout=WAIT
                    )
                    await expect(page.locator("#step")).to_have_text("rendering", timeout=WAIT)
                    await page.screenshot(path=shots / "activity.png")

                    # Cancel with a reason: it ends cancelled, with the reason and who asked.
                    await page.locator("#cancel-button").click()
                    await page.locator("#cancel-reason").fill("wrong cut, re-render tomorrow")
                    await page.locator("#cancel-name").fill("Ada")
                    await page.screenshot(path=shots / "cancel.png")
                    await page.locator("#cancel-confirm").click()
                    try:
                        await expect(page.locator("#activity-head h1 .badge")).to_have_text("cancelled", timeout=WAIT)
                    except AssertionError as exc:  # say where the cancel stopped (once: a stream ended early)
                        api = await (await page.request.get(f"{base}/api/activities/{aid}")).text()
                        tails = {n: "".join(p.output[-30:]) for n, p in procs.items()}
                        raise AssertionError(f"{exc}\nthe console's API: {api}\nthe call: {outcome}\n"
                                             f"page errors: {errors}\nservice output: {tails}") from None  # fmt: skip
                    await expect(page.locator("#activity-cause")).to_have_text(
                        "cancelled by Ada (console): wrong cut, re-render tomorrow", timeout=WAIT
                    )
                    await expect(page.locator("#cancel-button")).to_have_count(0, timeout=WAIT)
                    await expect(page.locator("#stream-state")).to_contain_text("ended cancelled", timeout=WAIT)

                    # A malformed event: under Dead letters, with the consumer that refused it and why.
                    await page.goto(f"{base}/dead-letters")
                    await expect(page.locator(".empty")).to_be_visible(timeout=WAIT)
                    await b.js.publish(b.subjects.build("session", "junk-1", "requested"), b'{"type": "session.requ')
                    dead = page.locator('tr[data-consumer="broker-requests"]')
                    await expect(dead).to_have_count(1, timeout=WAIT)
                    await expect(dead).to_contain_text("bad_json", timeout=WAIT)
                    await dead.locator("summary").click()
                    await expect(dead.locator("pre.payload").first).to_have_text('{"type": "session.requ', timeout=WAIT)
                    await page.screenshot(path=shots / "dead-letters.png")

                    # Health: the server, and every service process with its version.
                    await page.goto(f"{base}/health")
                    for service in ("recorder", "broker", "console", "console-test-worker"):
                        badge = page.locator(f'#services tr[data-service="{service}"] .badge')
                        await expect(badge).to_have_text("live", timeout=WAIT)
                    await expect(page.locator("#server-card .big")).to_have_text(
                        re.compile(r"^v\d+\.\d+"), timeout=WAIT
                    )
                    await page.screenshot(path=shots / "health.png", full_page=True)

                    # SIGKILL the worker: its session turns failed (worker_lost), live on the session page.
                    await page.goto(f"{base}/sessions/{info.session_id}")
                    await expect(page.locator("#session h1 .badge")).to_have_text("open", timeout=WAIT)
                    await expect(page.locator("#session .timeline li")).not_to_have_count(0, timeout=WAIT)
                    procs["worker"].kill()
                    await expect(page.locator("#session h1 .badge")).to_have_text("failed", timeout=WAIT)
                    await expect(page.locator("#session-cause")).to_contain_text("worker_lost", timeout=WAIT)
                    await page.screenshot(path=shots / "session.png", full_page=True)
                    await page.goto(f"{base}/workers")
                    await expect(page.locator(f'tr[data-id="{worker_id}"] .badge')).to_have_text("lost", timeout=WAIT)

                    # A narrow window: the same page, laid out for a phone.
                    await page.set_viewport_size({"width": 390, "height": 844})
                    await page.goto(f"{base}/activities")
                    await expect(page.locator(f'tr[data-id="{aid}"] .badge')).to_have_text("cancelled", timeout=WAIT)
                    await page.screenshot(path=shots / "activities-narrow.png")
                    assert errors == []
                finally:
                    await browser.close()
            await eventually(lambda: bool(outcome), timeout=30, interval=0.05, what="the caller saw the cancellation")
            tg.cancel_scope.cancel()
