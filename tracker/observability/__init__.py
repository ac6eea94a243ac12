"""Logs (JSON lines, secrets masked) and Prometheus metrics.

May import only the base modules (config, errors, clock, states): every layer logs
and counts, so this sits below them all.
"""
