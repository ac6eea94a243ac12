"""tracker: watches long-running AI generation tasks and delivers signed webhooks."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("acedata-tracker")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
