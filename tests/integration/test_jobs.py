"""How beat's dispatch groups a tick's batches into poll jobs, and what a job carries."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tracker.config import load_settings
from tracker.polling import PollBatch, Seen, claim_limit
from tracker.worker.app import POLL_QUEUE, make_celery
from tracker.worker.jobs import (
    POLL_JOB_BATCHES,
    jobs_per_tick,
    max_waiting_jobs,
    poll_jobs,
    polls_waiting,
)
from tracker.worker.messages import poll_batch_from_message, poll_batch_message


def batches(count: int) -> list[PollBatch]:
    return [PollBatch("luma", (f"t{n}",)) for n in range(count)]


@pytest.mark.parametrize(
    ("count", "threads", "jobs"),
    [
        (0, 16, 0),
        (1, 16, 1),
        (16, 16, 16),  # no more batches than threads: all polled at once, one a job
        (31, 16, 31),
        (40, 16, 20),  # two a job
        (2000, 16, 2000 // POLL_JOB_BATCHES),  # a backlog: POLL_JOB_BATCHES a job
        (2000, 1000, 1000),
    ],
)
def test_batches_share_jobs_only_when_there_are_more_than_threads(
    count: int, threads: int, jobs: int
) -> None:
    grouped = poll_jobs(batches(count), threads=threads)
    assert len(grouped) == jobs
    assert all(1 <= len(job) <= POLL_JOB_BATCHES for job in grouped)
    assert [batch for job in grouped for batch in job] == batches(count)  # each once, in order


def test_a_poll_job_carries_what_the_claim_saw() -> None:
    tick = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    batch = PollBatch(
        "luma",
        ("a", "b"),
        tick + timedelta(seconds=4.75),
        tick,
        {"a": (Seen("running", "processing", 0),), "b": (Seen("pending", None, 2),) * 2},
        probe=True,
    )
    message = json.loads(json.dumps(poll_batch_message(batch)))  # as the broker carries it
    assert poll_batch_from_message(message) == batch
    assert message[5] == [["running", "processing", 0], ["pending", None, 2]]  # each view once
    unseen = PollBatch("luma", ("a", "b"), batch.lease_until, tick)
    assert poll_batch_from_message(json.loads(json.dumps(poll_batch_message(unseen)))) == unseen


@pytest.mark.parametrize("kind", ["redis", "embedded"])
def test_a_tick_sees_the_poll_jobs_still_waiting_in_the_broker(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """What beat's dispatch reads to claim nothing while workers are behind."""
    url = (
        request.getfixturevalue("broker")
        if kind == "redis"
        else f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}"
    )
    app = make_celery(load_settings(broker_url=url, _env_file=None))
    try:
        assert polls_waiting(app) == 0  # nothing ever queued
        for _ in range(3):
            app.send_task("tracker.poll_batches", args=([],), queue=POLL_QUEUE)
        assert polls_waiting(app) == 3
        with app.connection_for_write() as connection:
            connection.default_channel.queue_purge(POLL_QUEUE)
        assert polls_waiting(app) == 0
    finally:
        app.close()


@pytest.mark.parametrize(("rps", "jobs", "waiting"), [(20, 20, 95), (50, 17, 81), (200, 25, 119)])
def test_dispatch_tolerates_the_jobs_of_a_lease_worth_of_full_ticks_waiting(
    rps: int, jobs: int, waiting: int
) -> None:
    """Dispatch claims nothing while more poll jobs wait than the ticks of one lease make
    (4.75 s at the default poll interval: 4.75 full ticks)."""
    settings = load_settings(upstream_rps=rps, _env_file=None)
    full_tick = batches(math.ceil(claim_limit(settings) / settings.batch_size))
    assert jobs_per_tick(settings) == len(poll_jobs(full_tick)) == jobs
    assert max_waiting_jobs(settings) == waiting


def test_a_views_progress_travels_only_when_there_is_one() -> None:
    from tracker.worker.messages import poll_batch_from_message, poll_batch_message

    seen = {"a": (Seen("running", None, 0, 35),), "b": (Seen("running", "processing", 0),)}
    batch = PollBatch("midjourney", ("a", "b"), seen=seen)
    message = poll_batch_message(batch)
    assert message[5] == [["running", None, 0, 35], ["running", "processing", 0]]
    assert poll_batch_from_message(message) == batch
