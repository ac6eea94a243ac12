"""The AceData task API: its client and the request budget shared by every worker.

`client` calls `retrieve` and `retrieve_batch` and turns the vendor's errors into
`tracker.errors.UpstreamError`s; `budget` spaces requests per token (in Redis or
the database) and pauses a token the upstream rate-limits or rejects.

May import: db, observability and the base modules.
"""
