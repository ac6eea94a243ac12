"""Each service's records through the real polling functions: states, progress, outputs.

The records are the vendor's own (tests/support/upstream/services/), so a Suno song
that streams its previews, or a Midjourney grid at 35 %, is what the tracker sees.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from tracker.clock import utcnow
from tracker.config import Settings
from tracker.db.models import Task, WebhookDelivery, task_schedule_table
from tracker.db.queries import task_resource
from tracker.polling import apply_batch_answer, claim_due_tasks, plan_batches
from tracker.tracking.clients import NewClient, create_client
from tracker.tracking.registration import register_task
from tracker.tracking.schemas import TaskRegistration

FIXTURES = Path(__file__).parents[1] / "support" / "upstream" / "services"
HOOK = "http://127.0.0.1:9/hook"
EVENTS = ["task.running", "task.completed", "task.failed"]


def example(service: str, where: str) -> dict[str, Any]:
    for item in json.loads((FIXTURES / f"{service}.json").read_text()):
        if item["example"].startswith(where):
            return dict(item["record"])
    raise LookupError(f"no example {where!r} of {service}")


def register(session: Session, settings: Settings, owner: NewClient, service: str) -> Task:
    registration = TaskRegistration(
        task_id="t-1", service=service, callback_url=HOOK, events=EVENTS
    )
    return register_task(session, owner.client, registration, settings=settings).task


def poll(session: Session, settings: Settings, service: str, record: dict[str, Any]) -> None:
    """One claimed poll of `service` answered with `record`, as a worker applies it (with
    what the claim saw); then every registration is due again at once."""
    now = utcnow() + timedelta(hours=1)
    claimed = claim_due_tasks(session, now=now, limit=10, settings=settings)
    (batch,) = [b for b in plan_batches(claimed, settings.batch_size) if b.service == service]
    answer = {"t-1": {**record, "id": "t-1"}}
    apply_batch_answer(session, batch, answer, now=now, settings=settings)
    session.commit()
    session.execute(
        task_schedule_table.update()
        .where(task_schedule_table.c.next_poll_at.is_not(None))
        .values(next_poll_at=utcnow(), claimed_until=None)
    )
    session.commit()


def payloads(session: Session) -> list[dict[str, Any]]:
    rows = session.query(WebhookDelivery).order_by(WebhookDelivery.created_at).all()
    return [json.loads(row.payload) for row in rows]


def test_a_suno_song_streaming_previews_is_not_done_until_every_song_is(
    session: Session, settings: Settings, client: NewClient
) -> None:
    task = register(session, settings, client, "suno")
    session.commit()
    lines = [
        e["record"]
        for e in json.loads((FIXTURES / "suno.json").read_text())
        if e["example"].startswith(("suno.md line 495", "suno.md line 496"))
    ]
    assert len(lines) == 3  # pending, running with previews, one song done and one running
    for line in lines:
        poll(session, settings, "suno", line)
        session.refresh(task)
        assert task.state in ("pending", "running")
    assert [p["type"] for p in payloads(session)] == ["task.running"]
    poll(session, settings, "suno", example("suno", "suno.md line 497"))
    session.refresh(task)
    assert task.state == "completed"
    done = payloads(session)[-1]
    assert done["type"] == "task.completed"
    audio = [o for o in done["data"]["outputs"] if o["type"] == "audio"]
    assert [o["url"].startswith("https://cdn1.suno.ai/") for o in audio] == [True, True]
    assert task_resource(task)["outputs"] == done["data"]["outputs"]


def test_midjourney_progress_is_kept_and_its_grids_are_not_a_result(
    session: Session, settings: Settings, client: NewClient
) -> None:
    task = register(session, settings, client, "midjourney")
    session.commit()
    seen = []
    for where in ("midjourney.md line 469", "midjourney.md line 470", "midjourney.md line 471"):
        poll(session, settings, "midjourney", example("midjourney", where))
        session.refresh(task)
        seen.append((task.state, task.progress))
        assert task_resource(task)["outputs"] == []
    assert seen == [("running", 35), ("running", 75), ("running", 100)]
    poll(session, settings, "midjourney", example("midjourney", "midjourney.md line 117"))
    session.refresh(task)
    assert (task.state, task.progress) == ("completed", 100)
    done = payloads(session)[-1]
    assert done["type"] == "task.completed"
    assert done["data"]["progress"] == 100
    (image,) = done["data"]["outputs"]
    assert (image["type"], image["width"], image["height"]) == ("image", 1024, 1024)


def test_an_unknown_service_is_tracked_by_the_generic_rules_and_says_so(
    session: Session, settings: Settings, client: NewClient
) -> None:
    task = register(session, settings, client, "qrart")
    session.commit()
    finished = {
        "response": {"success": True, "state": "completed", "image_url": "https://x/q.png"},
        "finished_at": 1767119885.0,
    }
    poll(session, settings, "qrart", finished)
    session.refresh(task)
    resource = task_resource(task)
    assert (resource["state"], resource["profile"]) == ("completed", "generic")
    assert resource["outputs"] == [{"type": "image", "url": "https://x/q.png"}]


def test_a_record_that_fits_no_rule_leaves_the_task_as_it_is(
    session: Session, settings: Settings, client: NewClient
) -> None:
    task = register(session, settings, client, "suno")
    session.commit()
    poll(session, settings, "suno", {"response": "an HTML error page"})
    session.refresh(task)
    assert (task.state, task.record) == ("pending", None)
    assert payloads(session) == []


def test_minimax_and_maestro_keep_their_words_where_they_are(
    session: Session, settings: Settings, client: NewClient
) -> None:
    owner = create_client(session, "second")
    minimax = register(session, settings, client, "minimax")
    maestro = register(session, settings, owner, "maestro")
    session.commit()
    poll(session, settings, "minimax", example("minimax", "minimax.md line 301"))
    poll(session, settings, "maestro", example("maestro", "maestro.md line 107"))
    session.refresh(minimax)
    session.refresh(maestro)
    assert (minimax.state, minimax.failure_code) == ("failed", "1026")
    assert (maestro.state, maestro.progress) == ("completed", 100)
    kinds = [o["type"] for o in task_resource(maestro)["outputs"]]
    assert kinds == ["video", "video", "file"]
