"""Polling functions over a real database: claims, batching, applying answers, deadlines."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from tracker.clock import utcnow
from tracker.config import Settings
from tracker.db.models import Task, TaskTransition, WebhookDelivery
from tracker.polling import (
    ClaimedTask,
    PollBatch,
    Seen,
    apply_batch_answer,
    claim_due_tasks,
    claim_limit,
    dispatch_interval,
    fail_not_found,
    next_poll_at,
    plan_batches,
    poll_lease,
    release_batch,
    time_out_overdue_tasks,
)
from tracker.tracking.clients import NewClient, create_client
from tracker.tracking.registration import register_task
from tracker.tracking.schemas import TaskRegistration

HOOK = "http://127.0.0.1:9/hook"


def register(
    session: Session, settings: Settings, owner: NewClient, task_id: str, **fields: Any
) -> Task:
    fields.setdefault("callback_url", HOOK)
    registration = TaskRegistration(task_id=task_id, **fields)
    return register_task(session, owner.client, registration, settings=settings).task


def record(task_id: str, state: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": task_id, "created_at": 1725077411.961, "request": {}}
    if state == "completed":
        body["response"] = {
            "success": True,
            "task_id": task_id,
            "state": "completed",
            "video_url": f"https://cdn.example/{task_id}.mp4",
        }
        body["finished_at"] = 1725077566.241
    elif state == "failed":
        body["response"] = {
            "success": False,
            "task_id": task_id,
            "state": "failed",
            "error": {"code": "bad_prompt", "message": "prompt refused"},
        }
    elif state is not None:
        body["response"] = {"success": True, "task_id": task_id, "state": state}
    return body


def transitions(session: Session, task: Task) -> list[tuple[str | None, str]]:
    rows = session.execute(
        select(TaskTransition.from_state, TaskTransition.to_state)
        .where(TaskTransition.task_row_id == task.id)
        .order_by(TaskTransition.id)
    )
    return [(a, b) for a, b in rows]


def test_claim_takes_due_tasks_once_until_the_lease_expires(
    session: Session, settings: Settings, client: NewClient
) -> None:
    for n in range(3):
        register(session, settings, client, f"t{n}")
    session.commit()
    now = utcnow() + timedelta(seconds=1)
    first = claim_due_tasks(session, now=now, limit=10, settings=settings)
    session.commit()
    assert sorted((c.service, c.task_id) for c in first) == [
        ("luma", "t0"),
        ("luma", "t1"),
        ("luma", "t2"),
    ]
    assert claim_due_tasks(session, now=now, limit=10, settings=settings) == []
    later = now + timedelta(seconds=61)
    assert len(claim_due_tasks(session, now=later, limit=2, settings=settings)) == 2


def test_plan_batches_takes_each_upstream_id_once_per_service() -> None:
    now = utcnow()
    pairs = [("luma", "a"), ("luma", "b"), ("luma", "a"), ("suno", "a"), ("luma", "c")]
    claimed = [ClaimedTask(service, task_id, now) for service, task_id in pairs]
    assert plan_batches(claimed, 2) == [
        PollBatch("luma", ("a", "b")),
        PollBatch("luma", ("c",)),
        PollBatch("suno", ("a",)),
    ]


def test_claim_limit_is_what_the_budget_serves_until_the_next_tick(settings: Settings) -> None:
    tuned = settings.model_copy(update={"upstream_rps": 4, "poll_interval": 5, "batch_size": 10})
    assert dispatch_interval(tuned) == 1.0  # ticks every second, whatever the poll interval
    assert claim_limit(tuned) == 40
    fast = tuned.model_copy(update={"poll_interval": 0.5})
    assert dispatch_interval(fast) == 0.5  # never less often than tasks are due
    assert claim_limit(fast) == 20


def test_answer_moves_each_task_and_writes_history_and_outbox(
    session: Session, settings: Settings, client: NewClient
) -> None:
    done = register(session, settings, client, "done", events=["task.running", "task.completed"])
    bad = register(session, settings, client, "bad")
    slow = register(session, settings, client, "slow")
    session.commit()
    now = utcnow()
    answer = {"done": record("done", "completed"), "bad": record("bad", "failed")}
    answer["slow"] = record("slow", "processing")
    applied = apply_batch_answer(
        session, PollBatch("luma", ("done", "bad", "slow")), answer, now=now, settings=settings
    )
    session.commit()
    assert applied.transitions == 3
    assert (done.state, bad.state, slow.state) == ("completed", "failed", "running")
    assert bad.failure == {"code": "bad_prompt", "message": "prompt refused"}
    assert done.next_poll_at is None
    assert done.finished_at == now
    assert slow.next_poll_at is not None
    assert transitions(session, done) == [(None, "pending"), ("pending", "completed")]
    events = session.scalars(select(WebhookDelivery.event).order_by(WebhookDelivery.event)).all()
    # `slow` went running, but only `done` subscribed to task.running; nobody else gets it.
    assert events == ["task.completed", "task.failed"]


def test_unchanged_answer_writes_no_history(
    session: Session, settings: Settings, client: NewClient
) -> None:
    task = register(session, settings, client, "t1")
    session.commit()
    batch = PollBatch("luma", ("t1",))
    for _ in range(3):
        apply_batch_answer(
            session, batch, {"t1": record("t1", "processing")}, now=utcnow(), settings=settings
        )
        session.commit()
    session.refresh(task)
    assert task.polls == 3
    assert task.state == "running"
    assert transitions(session, task) == [(None, "pending"), ("pending", "running")]


def test_same_upstream_id_of_three_clients_each_gets_its_own_transitions(
    session: Session, settings: Settings, client: NewClient
) -> None:
    others = [create_client(session, name) for name in ("beta", "gamma")]
    tasks = [register(session, settings, owner, "shared") for owner in [client, *others]]
    session.commit()
    apply_batch_answer(
        session,
        PollBatch("luma", ("shared",)),
        {"shared": record("shared", "completed")},
        now=utcnow(),
        settings=settings,
    )
    session.commit()
    for task in tasks:
        assert transitions(session, task) == [(None, "pending"), ("pending", "completed")]
    assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 3


def test_missing_ids_count_misses_then_ask_for_confirmation(
    session: Session, settings: Settings, client: NewClient
) -> None:
    tuned = settings.model_copy(update={"not_found_after": 2})
    task = register(session, tuned, client, "ghost")
    session.commit()
    batch = PollBatch("luma", ("ghost",))
    first = apply_batch_answer(session, batch, {}, now=utcnow(), settings=tuned)
    session.commit()
    assert first.missing == []
    second = apply_batch_answer(session, batch, {}, now=utcnow(), settings=tuned)
    session.commit()
    assert second.missing == ["ghost"]
    session.refresh(task)
    assert (task.state, task.misses) == ("pending", 2)
    fail_not_found(session, "luma", "ghost", now=utcnow(), misses=2)
    session.commit()
    assert task.state == "failed"
    assert task.failure is not None
    assert task.failure["code"] == "not_found"


def test_an_answer_resets_the_miss_counter(
    session: Session, settings: Settings, client: NewClient
) -> None:
    task = register(session, settings, client, "t1")
    session.commit()
    batch = PollBatch("luma", ("t1",))
    apply_batch_answer(session, batch, {}, now=utcnow(), settings=settings)
    apply_batch_answer(session, batch, {"t1": record("t1", None)}, now=utcnow(), settings=settings)
    session.commit()
    session.refresh(task)
    assert task.misses == 0


def test_overdue_tasks_time_out_with_a_webhook(
    session: Session, settings: Settings, client: NewClient
) -> None:
    task = register(session, settings, client, "stuck", timeout_seconds=1)
    register(session, settings, client, "fresh")
    session.commit()
    ids = time_out_overdue_tasks(session, now=utcnow() + timedelta(seconds=2))
    session.commit()
    assert task.state == "timed_out"
    assert len(ids) == 1
    assert session.get(WebhookDelivery, ids[0]).event == "task.timed_out"  # type: ignore[union-attr]


def test_polls_back_off_with_age(settings: Settings) -> None:
    now = utcnow()
    fresh = next_poll_at(now, now, settings) - now
    old = next_poll_at(now - timedelta(hours=1), now, settings) - now
    assert fresh == timedelta(seconds=settings.poll_interval)
    assert old == timedelta(seconds=settings.max_poll_interval)


def test_terminal_event_supersedes_pending_running_event(
    session: Session, settings: Settings, client: NewClient
) -> None:
    register(session, settings, client, "t1", events=["task.running", "task.completed"])
    session.commit()
    batch = PollBatch("luma", ("t1",))
    apply_batch_answer(
        session, batch, {"t1": record("t1", "processing")}, now=utcnow(), settings=settings
    )
    session.commit()
    apply_batch_answer(
        session, batch, {"t1": record("t1", "completed")}, now=utcnow(), settings=settings
    )
    session.commit()
    rows = session.execute(
        select(WebhookDelivery.event, WebhookDelivery.status).order_by(WebhookDelivery.created_at)
    ).all()
    assert [tuple(r) for r in rows] == [
        ("task.running", "superseded"),
        ("task.completed", "pending"),
    ]


def test_a_poll_leaves_alone_registrations_another_worker_has_leased_since(
    session: Session, settings: Settings, client: NewClient
) -> None:
    """A slow poll whose lease expired and was taken again writes nothing; the new one does."""
    task = register(session, settings, client, "t1")
    session.commit()
    now = utcnow() + timedelta(seconds=1)
    (stale,) = claim_due_tasks(session, now=now, limit=10, settings=settings)
    later = now + timedelta(seconds=61)
    (fresh,) = claim_due_tasks(session, now=later, limit=10, settings=settings)
    session.commit()
    answer = {"t1": record("t1", "completed")}
    (stale_batch,) = plan_batches([stale], 50)
    applied = apply_batch_answer(session, stale_batch, answer, now=later, settings=settings)
    session.commit()
    session.refresh(task)
    assert (applied.observed, applied.transitions) == (0, 0)
    # Both polls asked the upstream, each counted by its claim; only the fresh one writes.
    assert (task.state, task.polls, task.claimed_until) == ("pending", 2, fresh.lease_until)
    release_batch(session, stale_batch, retry_at=later + timedelta(seconds=600))
    session.commit()
    session.refresh(task)
    assert task.claimed_until == fresh.lease_until

    (fresh_batch,) = plan_batches([fresh], 50)
    applied = apply_batch_answer(session, fresh_batch, answer, now=later, settings=settings)
    session.commit()
    session.refresh(task)
    assert (applied.observed, applied.transitions) == (1, 1)
    assert task.state == "completed"
    assert transitions(session, task) == [(None, "pending"), ("pending", "completed")]


def test_unchanged_answers_reschedule_each_registration_from_its_own_age(
    session: Session, settings: Settings, client: NewClient
) -> None:
    """The set-based write keeps each row's own counters and next poll time, matched by id."""
    young = register(session, settings, client, "young")
    old = register(session, settings, client, "old")
    ghost = register(session, settings, client, "ghost")
    session.commit()
    now = utcnow()
    old.created_at = now - timedelta(hours=1)
    ghost.misses = 3
    session.commit()
    answer = {"young": record("young", None), "old": record("old", None)}
    batch = PollBatch("luma", ("old", "ghost", "young"))
    applied = apply_batch_answer(session, batch, answer, now=now, settings=settings)
    session.commit()
    for task in (young, old, ghost):
        session.refresh(task)
    assert (applied.observed, applied.transitions) == (3, 0)
    assert (young.polls, young.misses, young.next_poll_at) == (
        1,
        0,
        now + timedelta(seconds=settings.poll_interval),
    )
    assert (old.polls, old.next_poll_at) == (1, now + timedelta(seconds=settings.max_poll_interval))
    assert (ghost.polls, ghost.misses) == (0, 4)
    assert young.claimed_until is None
    assert transitions(session, young) == [(None, "pending")]


def test_next_polls_count_from_the_claiming_tick_not_from_the_answer(
    session: Session, settings: Settings, client: NewClient
) -> None:
    """Counted from a late answer, the next poll would miss the next tick and wait for another."""
    unchanged = register(session, settings, client, "unchanged")
    started = register(session, settings, client, "started")
    session.commit()
    tick = utcnow() + timedelta(seconds=1)
    batch = claimed_batch(session, settings, tick)
    answered = tick + timedelta(seconds=3)
    answer = {"unchanged": record("unchanged", None), "started": record("started", "processing")}
    apply_batch_answer(session, batch, answer, now=answered, settings=settings)
    session.commit()
    next_tick = tick + timedelta(seconds=settings.poll_interval)
    for task in (unchanged, started):
        session.refresh(task)
        assert task.next_poll_at == next_tick
    assert started.state == "running"
    reclaimed = claim_due_tasks(session, now=next_tick, limit=10, settings=settings)
    assert sorted(c.task_id for c in reclaimed) == ["started", "unchanged"]


def test_a_tick_takes_polls_falling_due_within_its_lookahead(
    session: Session, settings: Settings, client: NewClient
) -> None:
    task = register(session, settings, client, "t1")
    session.commit()
    now = utcnow()
    task.next_poll_at = now + timedelta(seconds=0.5)
    session.commit()

    assert claim_due_tasks(session, now=now, limit=10, settings=settings) == []
    claimed = claim_due_tasks(session, now=now, limit=10, settings=settings, lookahead=1.0)
    assert [c.task_id for c in claimed] == ["t1"]


def test_a_claim_counts_the_poll_sets_the_next_and_leases_no_further_than_the_next_tick(
    session: Session, settings: Settings, client: NewClient
) -> None:
    young = register(session, settings, client, "young")
    old = register(session, settings, client, "old")
    session.commit()
    tick = utcnow() + timedelta(seconds=1)
    old.created_at = tick - timedelta(hours=1)
    session.commit()
    lookahead = 0.25
    claims = claim_due_tasks(session, now=tick, limit=10, settings=settings, lookahead=lookahead)
    session.commit()
    assert {c.task_id: c.seen for c in claims} == {
        "young": Seen("pending", None, 0),
        "old": Seen("pending", None, 0),
    }
    lease_until = tick + timedelta(seconds=settings.poll_interval - lookahead)
    assert poll_lease(settings, lookahead) < settings.poll_lease
    for task in (young, old):
        session.refresh(task)
        assert (task.polls, task.claimed_until) == (1, lease_until)
    assert young.next_poll_at == tick + timedelta(seconds=settings.poll_interval)
    assert old.next_poll_at == tick + timedelta(seconds=settings.max_poll_interval)
    # PostgreSQL computes the next poll in the claim's statement: as `next_poll_at` does,
    # for services with a pace of their own (suno: advised; kling: set) and without.
    paced = settings.model_copy(update={"service_poll_intervals": {"kling": 7.5}})
    for age, service in itertools.product((0.0, 123.456789, 600.0), ("luma", "suno", "kling")):
        middle = register(session, settings, client, f"aged-{age}", service=service)
        middle.created_at = tick - timedelta(seconds=age)
        session.commit()
        claim_due_tasks(session, now=tick, limit=10, settings=paced)
        session.commit()
        session.refresh(middle)
        expected = next_poll_at(middle.created_at, tick, paced, service=service)
        assert middle.next_poll_at == expected, (age, service)
        if age == 0.0 and service != "luma":
            assert expected - tick > timedelta(seconds=settings.poll_interval), service
    # The next tick, a little early, takes the young one again: its lease has ended.
    next_tick = tick + timedelta(seconds=settings.poll_interval - lookahead / 2)
    again = claim_due_tasks(
        session, now=next_tick, limit=10, settings=settings, lookahead=lookahead
    )
    assert [c.task_id for c in again] == ["young"]


def claimed_batch(session: Session, settings: Settings, tick: datetime) -> PollBatch:
    [batch] = plan_batches(
        claim_due_tasks(session, now=tick, limit=10, settings=settings), settings.batch_size
    )
    session.commit()
    return batch


def test_an_answer_that_changes_nothing_the_claim_saw_costs_the_database_nothing(
    session: Session, settings: Settings, client: NewClient
) -> None:
    """Only ids whose answer differs from the claim's reading are read and written."""
    tasks = {task_id: register(session, settings, client, task_id) for task_id in "abc"}
    session.commit()
    tick = utcnow() + timedelta(seconds=1)
    batch = claimed_batch(session, settings, tick)
    statements: list[str] = []
    bind = session.get_bind()

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(bind, "before_cursor_execute", count)
    try:
        quiet = {task_id: record(task_id, None) for task_id in "abc"}
        applied = apply_batch_answer(session, batch, quiet, now=tick, settings=settings)
        session.commit()
        assert (applied.observed, applied.transitions, applied.missing) == (3, 0, [])
        assert statements == []

        # `a` starts running, `b` is missing from the answer (a miss to count), `c` is quiet.
        answer = {"a": record("a", "processing"), "c": record("c", None)}
        applied = apply_batch_answer(session, batch, answer, now=tick, settings=settings)
        session.commit()
        assert (applied.observed, applied.transitions) == (3, 1)
        assert statements
    finally:
        event.remove(bind, "before_cursor_execute", count)
    for task in tasks.values():
        session.refresh(task)
    assert {t: (task.state, task.polls, task.misses) for t, task in tasks.items()} == {
        "a": ("running", 1, 0),
        "b": ("pending", 1, 1),
        "c": ("pending", 1, 0),
    }
    assert (tasks["a"].claimed_until, tasks["b"].claimed_until) == (None, None)
    assert tasks["a"].next_poll_at == tick + timedelta(seconds=settings.poll_interval)
    assert tasks["c"].claimed_until == batch.lease_until  # untouched: it ends by itself


def test_an_answer_after_misses_resets_them_without_counting_the_poll_twice(
    session: Session, settings: Settings, client: NewClient
) -> None:
    task = register(session, settings, client, "t1")
    task.misses = 2
    session.commit()
    tick = utcnow() + timedelta(seconds=1)
    batch = claimed_batch(session, settings, tick)
    apply_batch_answer(session, batch, {"t1": record("t1", None)}, now=tick, settings=settings)
    session.commit()
    session.refresh(task)
    assert (task.polls, task.misses, task.claimed_until) == (1, 0, None)


def test_a_batch_given_back_uncounts_the_poll_its_claim_counted(
    session: Session, settings: Settings, client: NewClient
) -> None:
    task = register(session, settings, client, "t1")
    session.commit()
    tick = utcnow() + timedelta(seconds=1)
    batch = claimed_batch(session, settings, tick)
    retry_at = tick + timedelta(seconds=30)
    release_batch(session, batch, retry_at=retry_at)
    session.commit()
    session.refresh(task)
    assert (task.polls, task.next_poll_at, task.claimed_until) == (0, retry_at, None)
