"""The dashboard in a real headless Chromium against a live edge."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from playwright import sync_api as playwright_api
from playwright.sync_api import expect

from tests.edge.conftest import API_KEY, Edge
from worker.config import Settings
from worker.notify import OutboxDispatcher
from worker.notify.completion_callbacks import callback_client

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# A developer without Chromium is told so; CI, which installs it, never skips.
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="install Debian's chromium to run the dashboard tests",
)
TIMEOUT_MS = 10_000


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser, edge: Edge):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.console_errors = []
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
    page.on("pageerror", lambda e: page.console_errors.append(str(e)))
    page.goto(f"{edge.url}/#key={API_KEY}")
    page.wait_for_selector("#live.on")  # signed in and subscribed to /events
    page.wait_for_selector("#counts .card")  # first figures loaded
    yield page
    context.close()


def _create(service, **fields) -> dict:
    body = {"task_type": f"t{uuid.uuid4().hex[:10]}", **fields}
    response = service.post("/tasks", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def _row(page, task_id: str):
    return page.locator(f'tr[data-task-id="{task_id}"]')


def test_dashboard_loads_signed_in_without_console_errors(page) -> None:
    assert page.locator("#counts .card").count() == 6
    assert page.locator("#chart rect").count() == 14  # 7 days x (completed, failed)
    assert "key=" not in page.url  # the key left the address bar
    assert page.console_errors == []


def test_a_task_created_through_the_api_appears_without_reload(page, service) -> None:
    task = _create(service)
    _row(page, task["task_id"]).wait_for()
    assert _row(page, task["task_id"]).locator(".badge").inner_text() == "pending"
    assert page.console_errors == []


def test_status_and_progress_change_live(page, service) -> None:
    task = _create(service)
    row = _row(page, task["task_id"])
    row.wait_for()
    service.patch(f"/tasks/{task['task_id']}", json={"status": "in_progress", "progress": 40})
    row.locator(".badge.in_progress").wait_for()
    assert row.locator(".bar > div").get_attribute("style") == "width: 40%"
    service.patch(f"/tasks/{task['task_id']}", json={"status": "completed"})
    row.locator(".badge.completed").wait_for()


def test_cancel_from_the_task_page(page, service, db) -> None:
    task = _create(service)
    _row(page, task["task_id"]).click()
    page.locator("#detail:not(.hidden)").wait_for()
    page.click("#cancel")
    page.locator("#fields .badge.cancelled").wait_for()
    status = db.execute("select status from taskman.tasks where task_id = %s",
                        (task["task_id"],)).fetchone()["status"]
    assert status == "cancelled"
    assert page.locator('#timeline li[data-event="cancelled"]').count() == 1
    assert page.is_disabled("#cancel") and page.is_enabled("#retry")


def test_filters_by_status_type_and_id(page, service) -> None:
    kind = f"t{uuid.uuid4().hex[:10]}"
    done = _create(service, task_type=kind)
    waiting = _create(service, task_type=kind)
    other = _create(service)
    service.patch(f"/tasks/{done['task_id']}", json={"status": "completed"})
    rows = page.locator("#rows tr")
    page.fill("#f-type", kind)
    expect(rows).to_have_count(2)
    page.select_option("#f-status", "completed")
    expect(rows).to_have_count(1)
    expect(_row(page, done["task_id"])).to_have_count(1)
    page.select_option("#f-status", "")
    page.fill("#f-type", "")
    page.fill("#f-id", other["task_id"])
    expect(rows).to_have_count(1)
    expect(_row(page, other["task_id"])).to_have_count(1)
    expect(_row(page, waiting["task_id"])).to_have_count(0)


def test_task_data_is_shown_as_text_never_as_markup(page, service) -> None:
    trap = '<img src=x onerror="window.__pwned=1">'
    task = _create(service, external_id=trap, metadata={"note": trap})
    service.patch(f"/tasks/{task['task_id']}", json={"status": "completed", "result": {"h": trap}})
    _row(page, task["task_id"]).click()
    page.locator("#fields .badge.completed").wait_for()
    assert trap in page.inner_text("#fields")
    assert 'onerror=\\"window.__pwned=1\\"' in page.inner_text("#result")  # as JSON text
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#detail img").count() == 0


def test_phone_width_has_no_horizontal_scroll(browser, edge, service, tmp_path) -> None:
    _create(service, external_id="a-rather-long-external-identifier-" + "x" * 60)
    context = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{edge.url}/#key={API_KEY}")
    page.wait_for_selector("#rows tr")
    page.locator("#rows tr").first.click()
    page.locator("#detail:not(.hidden)").wait_for()
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    shot = tmp_path / "phone.png"
    page.screenshot(path=str(shot), full_page=True)
    context.close()
    assert overflow <= 0
    assert shot.stat().st_size > 10_000


def test_a_rejected_key_returns_to_sign_in(browser, edge) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{edge.url}/#key=not-a-key")
    page.locator("#login:not(.hidden)").wait_for()
    assert "not accepted" in page.inner_text("#login-error")
    context.close()


def test_a_callback_refused_by_the_network_policy_shows_on_the_task(page, service, db) -> None:
    # Made directly in the database (no edge check), as a plain insert through PostgREST is.
    task_id = db.execute("select taskman.create_task(callback_url => 'http://10.255.0.1/hook')"
                         " ->> 'task_id' as id").fetchone()["id"]
    service.patch(f"/tasks/{task_id}", json={"status": "completed"})

    async def deliver_once() -> None:  # one round of the worker's outbox, default policy
        settings = Settings(_env_file=None)
        async with (await psycopg.AsyncConnection.connect(db.info.dsn, autocommit=True) as conn,
                    callback_client(settings) as http):
            await OutboxDispatcher(settings, "dashboard-test", http).run_once(conn, "callback")

    with ThreadPoolExecutor(1) as pool:  # Playwright holds this thread's event loop
        pool.submit(asyncio.run, deliver_once()).result(30)
    page.fill("#f-id", task_id)
    _row(page, task_id).click()
    refusal = page.locator('#fields [data-field="callback"]')
    expect(refusal).to_contain_text("Refused by the network policy")
    expect(refusal).to_contain_text("blocked_by_network_policy")
    assert page.console_errors == []


def test_the_task_page_shows_submit_state_and_priority(page, service, db) -> None:
    task = _create(service, submit_url="https://api.example.com/jobs", priority=5,
                   heartbeat_seconds=60)
    _row(page, task["task_id"]).click()
    expect(page.locator("#submit-state")).to_contain_text("POST https://api.example.com/jobs")
    expect(page.locator("#submit-state")).to_contain_text("not sent yet")
    assert "Priority\n5" in page.inner_text("#fields").replace("\t", "\n")
    assert "every 60s" in page.inner_text("#fields")
    # As the worker records an accepted submit.
    db.execute("update taskman.tasks set submitted_at = now(), status = 'in_progress',"
               " poll_url = 'https://api.example.com/jobs/9' where task_id = %s",
               (task["task_id"],))
    _row(page, task["task_id"]).click()
    expect(page.locator("#submit-state")).to_contain_text("polling https://api.example.com/jobs/9")
