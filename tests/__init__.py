"""The test suite, by kind.

- `unit/`: pure functions and files, no database or server.
- `integration/`: one component against real PostgreSQL, SQLite, Redis and HTTP servers on
  loopback (the simulator, a webhook receiver), in the test process.
- `e2e/`: the real `tracker` processes (API, worker, beat, demo) end to end.
- `faults/`: the same processes while the database, broker, upstream and receivers misbehave.
- `support/`: the rigs those use (receiver, simulator handle, processes, fault rig, factories).
"""
