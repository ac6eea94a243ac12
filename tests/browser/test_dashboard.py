"""The dashboard in headless Chromium against the real API, PostgreSQL and the simulator:
sign-in, a task completing live, retrying a failed delivery, escaping, tenant isolation,
sign-out, expired sessions, sign-in links, and a screenshot of every page."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import requests
from playwright.sync_api import BrowserContext, ConsoleMessage, Page, Request, expect
from sqlalchemy import select, update

from tests.browser.conftest import Dashboard, screenshot
from tests.support.history_factory import add_delivery, add_task
from tests.support.receiver import Receiver, Reply
from tests.support.sim import SimulatorHandle
from tracker.api.ui.sessions import create_sign_in_link_token
from tracker.clock import utcnow
from tracker.db.models import DashboardSession, Task, WebhookDelivery
from tracker.delivery.attempt import attempt_deliveries
from tracker.polling import claim_due_tasks, plan_batches, run_poll_batch
from tracker.states import DELIVERY_FAILED
from tracker.tracking.clients import NewClient, create_client
from tracker.upstream.budget import DatabaseBudget, credential_key
from tracker.upstream.client import UpstreamClient

EVIL = "<script>window.__xss = 1</script><img src=x onerror=window.__xss=2>"


def new_client(dashboard: Dashboard, prefix: str = "client") -> NewClient:
    with dashboard.sessions.begin() as session:
        return create_client(session, f"{prefix}-{uuid.uuid4().hex[:6]}")


def register(dashboard: Dashboard, owner: NewClient, body: dict[str, Any]) -> dict[str, Any]:
    answer = requests.post(
        f"{dashboard.url}/v1/tasks",
        json=body,
        headers={"authorization": f"Bearer {owner.api_key}"},
        timeout=10,
    )
    assert answer.status_code == 201, answer.text
    task: dict[str, Any] = answer.json()
    return task


def poll_once(dashboard: Dashboard, simulator: SimulatorHandle, *, ahead: float = 0) -> None:
    """One tick's polls, as a worker makes them: claim what is due, ask the simulator."""
    settings = dashboard.settings.model_copy(update={"upstream_url": simulator.url})
    with dashboard.sessions.begin() as session:
        now = utcnow() + timedelta(seconds=ahead)
        claims = claim_due_tasks(session, now=now, limit=1000, settings=settings)
    upstream = UpstreamClient.from_settings(settings, max_retries=0)
    credential = credential_key(settings.upstream_bearer)
    budget = DatabaseBudget(dashboard.sessions, credential, settings.upstream_rps)
    for batch in plan_batches(claims, settings.batch_size):
        run_poll_batch(
            dashboard.sessions, upstream, budget, batch, settings=settings, credential=credential
        )


def sign_in(page: Page, dashboard: Dashboard, api_key: str, path: str = "/ui/") -> None:
    page.goto(dashboard.url + path)
    page.fill("#api_key", api_key)
    page.click("button[type=submit]")
    expect(page.get_by_test_id("client-name")).to_be_visible()


@pytest.fixture
def watched(page: Page, dashboard: Dashboard) -> Iterator[dict[str, list[str]]]:
    """What the page did: requests to other hosts, console errors (CSP violations show
    there), dialogs (an injected alert). Checked empty after the test. Images and media
    are exempt: outputs are previewed from the upstream's file host, by design (the CSP
    allows `https:` for them alone); the dashboard's own scripts, styles and calls are not."""
    seen: dict[str, list[str]] = {"foreign": [], "console": [], "dialogs": []}

    def on_request(request: Request) -> None:
        local = request.url.startswith((dashboard.url, "data:"))
        if not local and request.resource_type not in ("image", "media"):
            seen["foreign"].append(request.url)

    def on_console(message: ConsoleMessage) -> None:
        # A 401 or 404 answer is logged as an error too; a CSP violation says "Refused".
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            seen["console"].append(message.text)

    page.on("request", on_request)
    page.on("console", on_console)
    page.on("dialog", lambda dialog: (seen["dialogs"].append(dialog.message), dialog.dismiss()))
    yield seen
    assert seen["foreign"] == [], "the dashboard fetched from other hosts"
    assert seen["dialogs"] == [], "a script ran that the dashboard did not ship"


def test_sign_in_with_a_wrong_key_then_the_right_one_goes_to_the_page_asked_for(
    page: Page, context: BrowserContext, dashboard: Dashboard, watched: dict[str, list[str]]
) -> None:
    owner = new_client(dashboard)
    page.goto(dashboard.url + "/ui/deliveries?status=failed")
    expect(page.locator("h1")).to_have_text("Sign in")
    screenshot(page, "sign-in")
    page.fill("#api_key", "trk_this-is-not-a-key")
    page.click("button[type=submit]")
    expect(page.get_by_test_id("sign-in-error")).to_contain_text("That API key is not valid")
    page.fill("#api_key", owner.api_key)
    page.click("button[type=submit]")
    expect(page.get_by_test_id("client-name")).to_have_text(owner.client.name)
    assert page.url == dashboard.url + "/ui/deliveries?status=failed"
    (cookie,) = [c for c in context.cookies() if c["name"] == "tracker_session"]
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == "", "no script can read the session"
    assert watched["console"] == []


def test_a_task_moves_to_completed_on_the_page_without_a_reload(
    page: Page, dashboard: Dashboard, simulator: SimulatorHandle, watched: dict[str, list[str]]
) -> None:
    owner = new_client(dashboard)
    (upstream_id,) = simulator.seed([{"outcome": "completed", "duration": 600, "age": 10}])
    register(dashboard, owner, {"task_id": upstream_id, "metadata": {"prompt": "a fox"}})
    poll_once(dashboard, simulator)
    sign_in(page, dashboard, owner.api_key, "/ui/tasks")
    state = page.locator("tr[data-row-id] .live-state [data-state]")
    expect(state).to_have_text("running")
    page.evaluate("window.__sameDocument = 'yes'")

    simulator.finish(upstream_id, "completed")
    poll_once(dashboard, simulator, ahead=30)

    expect(state).to_have_text("completed", timeout=8000)
    assert page.evaluate("window.__sameDocument") == "yes", "the page was reloaded"
    screenshot(page, "tasks")
    page.click(f"text={upstream_id}")
    expect(page.locator(".timeline li")).to_have_count(3)
    expect(page.get_by_test_id("record")).to_contain_text('"state": "completed"')
    screenshot(page, "task")
    assert watched["console"] == []


def test_retrying_a_failed_delivery_delivers_it_again(
    page: Page,
    dashboard: Dashboard,
    simulator: SimulatorHandle,
    receiver: Receiver,
    watched: dict[str, list[str]],
) -> None:
    owner = new_client(dashboard)
    receiver.script("/hook", Reply(500, body=b"receiver is down"))
    (upstream_id,) = simulator.seed([{"outcome": "completed", "duration": 0}])
    register(dashboard, owner, {"task_id": upstream_id, "callback_url": receiver.url("/hook")})
    poll_once(dashboard, simulator)
    with dashboard.sessions() as session:
        (delivery_id,) = session.scalars(
            select(WebhookDelivery.id).where(WebhookDelivery.client_id == owner.client.id)
        ).all()
    # The retry schedule has one attempt: a 500 fails the delivery for good.
    attempt_deliveries(dashboard.sessions, [delivery_id], settings=dashboard.settings)

    sign_in(page, dashboard, owner.api_key, "/ui/deliveries?status=failed")
    row = page.locator(f"tr[data-delivery-id='{delivery_id}']")
    expect(row).to_contain_text("failed")
    screenshot(page, "deliveries")
    row.get_by_test_id(f"retry-{delivery_id}").click()
    expect(page.get_by_test_id("notice")).to_contain_text("Due again now")

    attempt_deliveries(dashboard.sessions, [delivery_id], settings=dashboard.settings)
    page.goto(f"{dashboard.url}/ui/deliveries/{delivery_id}")
    expect(page.get_by_test_id("delivery-status")).to_have_text("succeeded")
    expect(page.locator("table.attempts tbody tr")).to_have_count(2)
    expect(page.locator("table.attempts")).to_contain_text("receiver is down")
    screenshot(page, "delivery")
    assert [r.headers["webhook-id"] for r in receiver.requests] == [delivery_id, delivery_id]


def test_metadata_records_and_answers_render_as_text(
    page: Page, dashboard: Dashboard, watched: dict[str, list[str]]
) -> None:
    owner = new_client(dashboard)
    with dashboard.sessions.begin() as session:
        task = add_task(session, owner.client, "xss-task", state="completed", callback_url=None)
        task.metadata_ = {"note": EVIL}
        task.record = {"id": "xss-task", "response": {"state": EVIL}}
        delivery = add_delivery(session, task, status=DELIVERY_FAILED, attempt_codes=(500,))
        delivery.attempt_log[0].response_excerpt = EVIL
        delivery_id = delivery.id
    sign_in(page, dashboard, owner.api_key, "/ui/tasks/xss-task")
    expect(page.get_by_test_id("metadata")).to_contain_text(EVIL)
    expect(page.get_by_test_id("record")).to_contain_text(EVIL)
    page.goto(f"{dashboard.url}/ui/deliveries/{delivery_id}")
    expect(page.locator("pre.excerpt")).to_have_text(EVIL)
    assert page.evaluate("window.__xss") is None


def test_a_client_sees_none_of_another_clients_tasks(
    page: Page, dashboard: Dashboard, watched: dict[str, list[str]]
) -> None:
    ours, theirs = new_client(dashboard, "ours"), new_client(dashboard, "theirs")
    with dashboard.sessions.begin() as session:
        add_task(session, ours.client, "our-task", state="running", callback_url=None)
        their = add_task(session, theirs.client, "their-task", state="failed", callback_url=None)
        their_delivery = add_delivery(session, their, status=DELIVERY_FAILED).id
    sign_in(page, dashboard, ours.api_key, "/ui/tasks")
    expect(page.locator("table.tasks")).to_contain_text("our-task")
    expect(page.locator("table.tasks")).not_to_contain_text("their-task")
    page.goto(f"{dashboard.url}/ui/tasks/their-task")
    expect(page.get_by_test_id("not-found")).to_contain_text("No task 'their-task'")
    page.goto(f"{dashboard.url}/ui/deliveries/{their_delivery}")
    expect(page.get_by_test_id("not-found")).to_be_visible()
    page.goto(f"{dashboard.url}/ui/deliveries")
    expect(page.locator("table.deliveries")).not_to_contain_text(their_delivery)


def test_sign_out_then_an_expired_session_returns_to_the_page_after_signing_in(
    page: Page, dashboard: Dashboard, watched: dict[str, list[str]]
) -> None:
    owner = new_client(dashboard)
    sign_in(page, dashboard, owner.api_key)
    page.click("text=Sign out")
    expect(page.locator(".notice")).to_contain_text("You are signed out")
    page.goto(dashboard.url + "/ui/tasks")
    expect(page.locator("h1")).to_have_text("Sign in")

    sign_in(page, dashboard, owner.api_key)
    with dashboard.sessions.begin() as session:
        session.execute(
            update(DashboardSession)
            .where(DashboardSession.client_id == owner.client.id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    page.goto(dashboard.url + "/ui/tasks?state=failed")
    expect(page.locator(".notice")).to_contain_text("Your session has ended")
    page.fill("#api_key", owner.api_key)
    page.click("button[type=submit]")
    expect(page.get_by_test_id("client-name")).to_be_visible()
    assert page.url == dashboard.url + "/ui/tasks?state=failed"


def test_a_sign_in_link_signs_in_once(
    browser_context_pair: tuple[Page, Page], dashboard: Dashboard
) -> None:
    first, second = browser_context_pair
    owner = new_client(dashboard)
    with dashboard.sessions.begin() as session:
        token = create_sign_in_link_token(session, owner.client, now=utcnow())
    link = f"{dashboard.url}/ui/login?token={token}"
    first.goto(link)
    expect(first.get_by_test_id("client-name")).to_have_text(owner.client.name)
    assert first.url == dashboard.url + "/ui/"
    second.goto(link)
    expect(second.get_by_test_id("sign-in-error")).to_contain_text("used already")


@pytest.fixture
def browser_context_pair(context: BrowserContext, page: Page) -> Iterator[tuple[Page, Page]]:
    other = context.browser.new_context()  # type: ignore[union-attr]
    yield page, other.new_page()
    other.close()


def test_every_page_renders_with_a_history_and_is_captured(
    page: Page, dashboard: Dashboard, watched: dict[str, list[str]]
) -> None:
    """A client with a varied history: each page renders within the CSP (no console error),
    and its screenshot is saved."""
    owner = new_client(dashboard, "acme")
    now = utcnow()
    with dashboard.sessions.begin() as session:
        plan = [
            ("luma", "completed"), ("luma", "completed"), ("luma", "running"),
            ("luma", "failed"), ("suno", "completed"), ("suno", "pending"),
            ("kling", "running"), ("kling", "completed"),
        ]  # fmt: skip
        for n, (service, state) in enumerate(plan):
            task = add_task(
                session, owner.client, f"{service}-{n:02d}-{uuid.uuid4().hex[:8]}",
                service=service, state=state, callback_url=None,
                created_at=now - timedelta(minutes=30 - n),
            )  # fmt: skip
            if state in ("completed", "failed"):
                status = DELIVERY_FAILED if n == 3 else "succeeded"
                add_delivery(
                    session, task, status=status, created_at=task.created_at,
                    event=f"task.{state}", attempt_codes=(500, 502) if n == 3 else (200,),
                )  # fmt: skip
        rows = session.scalars(select(Task.id).where(Task.client_id == owner.client.id)).all()
    assert len(rows) == len(plan)
    # Destinations come from the delivery engine's operations; a fixed set stands in here.
    dashboard.app.state.destination_operations = FixedDestinations()
    try:
        sign_in(page, dashboard, owner.api_key)
        expect(page.locator("h1")).to_have_text("Overview")
        expect(page.locator("main")).to_contain_text("2 of 3 open or disabled")
        screenshot(page, "overview")
        page.goto(dashboard.url + "/ui/destinations")
        expect(page.locator("table.destinations tbody tr")).to_have_count(3)
        screenshot(page, "destinations")
    finally:
        dashboard.app.state.destination_operations = None
    page.goto(dashboard.url + "/ui/tasks?service=luma")
    expect(page.locator("table.tasks tbody tr")).to_have_count(4)
    assert watched["console"] == []


class FixedDestinations:
    """Destination operations with three fixed destinations, one in each state."""

    def list_destinations(self, session: object, *, client_id: int) -> list[dict[str, Any]]:
        ago = (utcnow() - timedelta(hours=3)).isoformat()
        return [
            {"id": "dst_1", "scheme": "https", "host": "hooks.acme.example", "port": 443,
             "state": "healthy", "consecutive_failures": 0, "last_success_at": utcnow().isoformat(),
             "held_deliveries": 0},
            {"id": "dst_2", "scheme": "https", "host": "crm.acme.example", "port": 8443,
             "state": "open", "consecutive_failures": 23, "last_success_at": ago,
             "held_deliveries": 41},
            {"id": "dst_3", "scheme": "http", "host": "legacy.acme.example", "port": 80,
             "state": "disabled", "consecutive_failures": 1250, "last_success_at": None,
             "held_deliveries": 0},
        ]  # fmt: skip

    def resume_destination(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        raise AssertionError("not called by this test")

    def replay_deliveries(self, *args: Any, **kwargs: Any) -> int:
        raise AssertionError("not called by this test")
