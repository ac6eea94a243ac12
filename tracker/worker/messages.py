"""The poll job's message: a `PollBatch` as JSON, compact enough for thousands a second.

A batch travels as a list: service, ids, lease and tick (ISO 8601), the probe flag,
then what the claim saw of each id's registrations: the distinct views (`[state,
upstream word, misses]`, and the progress where there is one; most registrations share
one) and, per id, the index of its registration's view (a list of indexes for an id
several clients watch). A batch without views (`seen` None) carries None in both
places. Last comes the fingerprint of the token to poll with (None: the tracker's).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from tracker.polling import PollBatch, Seen

PollBatchMessage = Sequence[Any]


def poll_batch_message(batch: PollBatch) -> PollBatchMessage:
    """A batch as a poll job carries it."""
    lease = batch.lease_until.isoformat() if batch.lease_until else None
    tick = batch.claimed_at.isoformat() if batch.claimed_at else None
    message: list[Any] = [
        batch.service,
        list(batch.task_ids),
        lease,
        tick,
        batch.probe,
        None,
        None,
        batch.credential,
    ]
    if batch.seen is not None:
        views: dict[Seen, int] = {}
        refs: list[int | list[int]] = []
        for task_id in batch.task_ids:
            registrations = batch.seen[task_id]
            if len(registrations) == 1:
                refs.append(views.setdefault(registrations[0], len(views)))
            else:
                refs.append([views.setdefault(seen, len(views)) for seen in registrations])
        # A view's progress travels only when there is one: most services report none.
        message[5:7] = [
            [list(view if view.progress is not None else view[:3]) for view in views],
            refs,
        ]
    return message


def poll_batch_from_message(message: PollBatchMessage) -> PollBatch:
    """The batch a poll job's message carries."""
    service, task_ids, lease_until, claimed_at, probe, views, refs, credential = message
    seen = None
    if views is not None:
        alone = [(Seen(*view),) for view in views]
        seen = {
            task_id: alone[ref] if isinstance(ref, int) else tuple(alone[r][0] for r in ref)
            for task_id, ref in zip(task_ids, refs, strict=True)
        }
    return PollBatch(
        service,
        tuple(task_ids),
        datetime.fromisoformat(lease_until) if lease_until else None,
        datetime.fromisoformat(claimed_at) if claimed_at else None,
        seen,
        probe,
        credential,
    )
