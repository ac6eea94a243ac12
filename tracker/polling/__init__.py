"""Polling: claim due registrations, batch distinct upstream ids, apply the answers.

One tick: `claim_due_tasks` leases the due registrations, counts their polls and
sets their next ones, noting what it saw of each (`schedule`, `claim`);
`plan_batches` groups them by service and takes each upstream id once however
many clients watch it (`batches`); each batch is polled by `run_poll_batch`:
budget slot, one `retrieve_batch` call, then `apply_batch_answer` in one
transaction, which writes only what the answer changes (`run`, `apply`).

Functions over a session; nothing here knows about Celery or HTTP routes.
May import: tracking, upstream, db, observability and the base modules.
"""

from tracker.polling.apply import apply_batch_answer, fail_not_found, time_out_overdue_tasks
from tracker.polling.batches import (
    BatchApplied,
    ClaimedTask,
    PollBatch,
    PollOutcome,
    Seen,
    plan_batches,
)
from tracker.polling.claim import claim_due_tasks, release_batch, renew_lease
from tracker.polling.run import MAX_BUDGET_WAIT, TaskUpstream, run_poll_batch, run_poll_job
from tracker.polling.schedule import (
    claim_limit,
    claim_lookahead,
    dispatch_interval,
    next_poll_at,
    poll_lease,
)

__all__ = [
    "MAX_BUDGET_WAIT",
    "BatchApplied",
    "ClaimedTask",
    "PollBatch",
    "PollOutcome",
    "Seen",
    "TaskUpstream",
    "apply_batch_answer",
    "claim_due_tasks",
    "claim_limit",
    "claim_lookahead",
    "dispatch_interval",
    "fail_not_found",
    "next_poll_at",
    "plan_batches",
    "poll_lease",
    "release_batch",
    "renew_lease",
    "run_poll_batch",
    "run_poll_job",
    "time_out_overdue_tasks",
]
