"""The history database: engine and sessions, the tables, the read queries, migrations.

`engine` makes engines and holds the few places SQLite and PostgreSQL differ;
`models` declares the tables (an interface users query with SQL, changed only by
Alembic migrations); `queries` is the read side shared by the API and the CLI
(listings, pages, resource dicts); `migrate` runs Alembic from the package.

May import: observability and the base modules (config, errors, clock, states).
"""
