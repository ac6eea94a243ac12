"""Tools for people and tests: the upstream simulator and `tracker demo`.

Imported by the CLI and the tests, never by core code (an import-linter contract
says so). May import anything below the CLI.
"""
