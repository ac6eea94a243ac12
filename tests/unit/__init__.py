"""Pure functions and files: no database, broker or server."""
