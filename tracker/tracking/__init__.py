"""What a tracked task is: registration, normalisation, transitions, clients.

`normalise` reads an upstream record into a state; `registration` registers and
cancels tasks; `transitions` is the one way a task changes state (its history
row and its outbox rows in the caller's transaction); `clients` holds API keys
and webhook secrets; `schemas` the registration contract. Functions take a
session and do not commit.

May import: db, observability and the base modules.
"""
