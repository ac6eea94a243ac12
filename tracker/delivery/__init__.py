"""Webhook delivery: the outbox, one attempt, its outcome, signing and the SSRF guard.

`outbox` says which deliveries are due and in what order, and resends one;
`claims` leases due deliveries within what their destinations allow (and hands
freed slots over); `attempt` runs one deliver job (claim, send, record), whose
machinery in flight is `pump` (and `settler`, which records 2xx answers from the
sending threads on PostgreSQL); `sender` sends one request to a vetted address;
`netguard` vets callback addresses after DNS resolution; `signing` signs per
Standard Webhooks; `outcome` applies the outcome rules and retry schedule, on the
rows and attempt log of `rows`; `retries` is the retry schedule; `destinations`
keeps each destination's concurrency and circuit breaker; `operations` queues the
operational events; `replay` delivers again, in bulk, a client's deliveries matching a filter.

May import: tracking, upstream, db, observability and the base modules.
"""
