"""What a claim hands to a poll: claimed registrations grouped into batches of distinct ids."""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

log = logging.getLogger("tracker.polling")


class Seen(NamedTuple):
    """What a claim read of one registration: what its poll's answer is compared with."""

    state: str
    upstream_state: str | None
    misses: int
    progress: int | None = None


class ClaimedTask(NamedTuple):
    """A leased registration: which upstream id, when its poll was due, until when it is ours,
    what it was when claimed (`seen`) and the fingerprint of the token its client polls
    with (`credential`; None: the tracker's)."""

    service: str
    task_id: str
    due_at: datetime
    lease_until: datetime | None = None
    claimed_at: datetime | None = None
    seen: Seen | None = None
    credential: str | None = None


@dataclass(frozen=True)
class PollBatch:
    """Distinct upstream ids of one service, polled with one `retrieve_batch` call.

    `lease_until` is the `claimed_until` the claim wrote: a registration leased
    since by another worker (its lease differs and is live) is not written.
    `claimed_at` is the tick that claimed it, from which its next poll counts (not
    from the answer: a task keeps its place in the ticks' rhythm however long the
    job waited).

    `seen`: what the claim saw, per id; an answer matching it is not written
    (docs/decisions/0001-write-nothing-polling.md). Without it (a batch built by
    hand) every registration is read, and the answer counts the poll and sets the
    next one from `claimed_at`.

    `probe`: the upstream had rejected the token when the batch was claimed; an
    answer clears that (`tracker.upstream.budget.clear_rejected`).

    `credential`: the fingerprint of the token to poll with (a client's own, or the
    tracker's); None: the tracker's.
    """

    service: str
    task_ids: tuple[str, ...]
    lease_until: datetime | None = None
    claimed_at: datetime | None = None
    seen: Mapping[str, tuple[Seen, ...]] | None = None
    probe: bool = False
    credential: str | None = None


@dataclass
class BatchApplied:
    """What applying one answer did."""

    observed: int = 0
    transitions: int = 0
    delivery_ids: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # reached TRACKER_NOT_FOUND_AFTER


@dataclass
class PollOutcome:
    """What polling one batch did; `error` names why its answer was not applied, if so."""

    applied: BatchApplied = field(default_factory=BatchApplied)
    error: str | None = None


def plan_batches(
    claimed: Iterable[ClaimedTask],
    batch_size: int,
    *,
    probe: bool = False,
    probing: Collection[str | None] = (),
    paused: Collection[str | None] = (),
) -> list[PollBatch]:
    """Group claimed registrations by service and token, each upstream id once, `batch_size`
    per batch.

    An id watched by clients with different tokens is still asked once: with the token
    of its first claimed registration whose token is not `paused` (rejected by the
    upstream a moment ago), or a paused one if all are. `probe`, or a token in
    `probing`: the token was rejected when they were claimed (see `PollBatch`).
    """
    Group = tuple[str, datetime | None, datetime | None]
    groups: dict[Group, dict[str, tuple[Seen, ...]]] = {}
    tokens: dict[Group, dict[str, str | None]] = {}  # the token each id is asked with
    alone: dict[Seen, tuple[Seen]] = {}  # one tuple per distinct view, shared
    for claim in claimed:
        key = (claim.service, claim.lease_until, claim.claimed_at)
        ids = groups.get(key)
        if ids is None:
            ids = groups[key] = {}  # a dict keeps first-seen order, unlike a set
            tokens[key] = {}
        seen = claim.seen
        views = () if seen is None else alone.get(seen) or alone.setdefault(seen, (seen,))
        earlier = ids.get(claim.task_id)
        ids[claim.task_id] = views if earlier is None else earlier + views
        chosen = tokens[key]
        if earlier is None or (chosen[claim.task_id] in paused and claim.credential not in paused):
            chosen[claim.task_id] = claim.credential
    batches = []
    for (service, lease_until, claimed_at), ids in groups.items():
        by_token: dict[str | None, list[str]] = {}
        for task_id, credential in tokens[(service, lease_until, claimed_at)].items():
            by_token.setdefault(credential, []).append(task_id)
        for credential, distinct in by_token.items():
            for start in range(0, len(distinct), batch_size):
                chunk = tuple(distinct[start : start + batch_size])
                chunk_seen = {task_id: ids[task_id] for task_id in chunk}
                batch_seen = chunk_seen if all(chunk_seen.values()) else None
                batches.append(
                    PollBatch(
                        service,
                        chunk,
                        lease_until,
                        claimed_at,
                        batch_seen,
                        probe or credential in probing,
                        credential,
                    )
                )
    return batches
