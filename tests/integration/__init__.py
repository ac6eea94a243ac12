"""One component at a time against real databases, Redis and loopback HTTP servers."""
