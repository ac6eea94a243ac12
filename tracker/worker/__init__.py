"""The Celery side: the app and beat schedule, thin jobs, the processes that run them.

`app` configures Celery from the settings (when first used, not at import);
`jobs` are thin (ids in, polling and delivery functions called, doorbells rung);
`pollers` is what a process's jobs share: settings, sessions, a poller per token;
`messages` is the poll job's wire format; `doorbells` gathers deliver jobs;
`roles` starts worker, beat, or everything for `tracker up`.

May import: polling, delivery and everything below them.
"""
