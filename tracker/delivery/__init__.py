"""Webhook delivery: the outbox, one attempt, its outcome, signing and the SSRF guard.

`outbox` leases due deliveries; `attempt` runs one deliver job (claim, send,
record); `sender` sends one request to a vetted address; `netguard` vets
callback addresses after DNS resolution; `signing` signs per Standard Webhooks;
`outcome` logs attempts and applies the outcome rules and retry schedule.

May import: tracking, upstream, db, observability and the base modules.
"""
