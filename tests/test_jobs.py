"""How beat's dispatch groups a tick's batches into poll jobs."""

from __future__ import annotations

import pytest

from tracker.jobs import POLL_JOB_BATCHES, poll_jobs
from tracker.polling import PollBatch


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
        (2000, 16, 500),  # a backlog: POLL_JOB_BATCHES a job
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
