"""The doorbell: the upstream's callback makes a task due for a poll now.

A submission gives AceData `{TRACKER_PUBLIC_URL}/v1/doorbell/{token}` as its
callback URL, with a token drawn per registration (192 random bits) and stored only
as its SHA-256. AceData's callbacks are unsigned, so the tracker trusts nothing in
them: ringing only moves the task's next poll to now, and the poll's answer decides.
An unknown token, a finished task, or a ring while the task is already due change
nothing. Functions take a session and do not commit.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Collection
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tracker.db.models import task_schedule_table, tasks_table

DOORBELL_TOKEN_BYTES = 24
MAX_DOORBELL_TOKEN = 128


def new_doorbell_token() -> str:
    """An unguessable token for one registration's doorbell URL."""
    return secrets.token_urlsafe(DOORBELL_TOKEN_BYTES)


def doorbell_hash(token: str) -> str:
    """What is stored of a doorbell token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def doorbell_url(public_url: str, token: str) -> str:
    """The callback URL a submission gives the upstream."""
    return f"{public_url.rstrip('/')}/v1/doorbell/{token}"


def ring_doorbells(session: Session, tokens: Collection[str], *, now: datetime) -> list[int]:
    """Make the tasks of these doorbell tokens due for a poll now; the row ids that became due.

    Only a task still polled (`next_poll_at` set) and not due yet is moved, so unknown
    tokens, finished tasks and repeated rings change nothing. Its lease ends too: a
    claim's lease outlives its poll when the answer changed nothing (nothing is written
    then, docs/decisions/0001-write-nothing-polling.md), and a poll still in flight has
    asked before the callback came; its answer is then not written, as for any
    registration another claim has taken since.
    """
    hashes = [doorbell_hash(t) for t in set(tokens) if t and len(t) <= MAX_DOORBELL_TOKEN]
    if not hashes:
        return []
    schedule = task_schedule_table.c
    tasks = select(tasks_table.c.id).where(tasks_table.c.doorbell_hash.in_(hashes))
    rung = session.execute(
        update(task_schedule_table)
        .where(
            schedule.task_row_id.in_(tasks.scalar_subquery()),
            schedule.next_poll_at.is_not(None),
            schedule.next_poll_at > now,
        )
        .values(next_poll_at=now, claimed_until=None)
        .returning(schedule.task_row_id)
    )
    return list(rung.scalars())
