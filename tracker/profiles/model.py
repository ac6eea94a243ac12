"""What a service profile is, and how one reads a record: state words, progress, outputs.

A profile is data: paths into a record (`"response.data[].state"`: the `state` of
every item of the list `response.data`), word sets, the completion signal of a
record without a word, and where the artifacts are. The readers here are pure
and cheap: a path is parsed once, when the profile is made, and reading one is a
few dictionary look-ups, so normalising a record costs about what it did before
profiles (docs/decisions/0001-write-nothing-polling.md: polling is the hot path).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

OutputType = Literal["video", "audio", "image", "file"]
OUTPUT_TYPES: tuple[OutputType, ...] = ("video", "audio", "image", "file")
# What ends a task whose record has no state word (docs/architecture.md):
#   finished_at: `finished_at` (record or response) and no `success: false`;
#   success: `response.success: true` and at least one output (services whose
#            finished records carry no `finished_at`).
FinishSignal = Literal["finished_at", "success"]

# The word sets of AceData's SDK, which every profile starts from.
DONE_WORDS = frozenset({"succeed", "succeeded", "success", "completed", "complete", "finished"})
FAILED_WORDS = frozenset({"failed", "failure", "error", "cancelled", "canceled", "rejected"})
PENDING_WORDS = frozenset({"pending", "queued", "submitted"})

Path = tuple[str, ...]
_EACH = "[]"  # a path step: every item of a list


def parse_path(text: str) -> Path:
    """`"response.data[].state"` -> `("response", "data", "[]", "state")`."""
    steps: list[str] = []
    for part in text.split("."):
        if not part:
            raise ValueError(f"a path has an empty step (got {text!r})")
        if part.endswith(_EACH):
            steps += [part[: -len(_EACH)], _EACH]
        else:
            steps.append(part)
    return tuple(steps)


def read_path(node: Any, path: Path) -> Iterator[Any]:
    """Every value at `path` in `node` (none if a step is missing or of the wrong type)."""
    if not path:
        yield node
        return
    step, rest = path[0], path[1:]
    if step == _EACH:
        if isinstance(node, list):
            for item in node:
                yield from read_path(item, rest)
    elif isinstance(node, dict):
        value = node.get(step)
        if value is not None:
            yield from read_path(value, rest)


@dataclass(frozen=True)
class OutputSpec:
    """Where one kind of artifact sits: `at` names a dict or a list of dicts (the items),
    `url` the key of the artifact's URL in each item, the rest the keys of its details."""

    type: OutputType
    at: str
    url: str
    thumbnail_url: str | None = None
    width: str | None = None
    height: str | None = None
    duration: str | None = None
    title: str | None = None
    path: Path = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.type not in OUTPUT_TYPES:
            raise ValueError(f"an output type is one of {OUTPUT_TYPES} (got {self.type!r})")
        object.__setattr__(self, "path", parse_path(self.at) if self.at else ())

    def read(self, record: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for item in read_path(record, self.path):
            if not isinstance(item, dict):
                continue
            url = item.get(self.url)
            if not _is_url(url):
                continue
            output: dict[str, Any] = {"type": self.type, "url": url}
            if self.thumbnail_url and _is_url(thumbnail := item.get(self.thumbnail_url)):
                output["thumbnail_url"] = thumbnail
            for name in ("width", "height", "duration"):
                key = getattr(self, name)
                number = _number(item.get(key)) if key else None
                if number is not None:
                    output[name] = int(number) if name != "duration" else number
            if self.title and isinstance(title := item.get(self.title), str) and title:
                output["title"] = title
            yield output


@dataclass(frozen=True)
class Profile:
    """How one AceData task service keeps its state, progress and artifacts.

    `state_at`: the paths of the state word (`None`: the generic search, anywhere in
    `response` and at the record's top level; `()`: the service has no word).
    `finish`: what ends a task when its record has no word. `requires_output`: a done
    word with no output at all is a failure (`no_output`). `poll_interval`: the
    vendor's advised seconds between polls of a fresh task (None: the tracker's).
    """

    service: str
    state_at: tuple[str, ...] | None
    outputs: tuple[OutputSpec, ...] = ()
    progress_at: str | None = None
    finish: tuple[FinishSignal, ...] = ("finished_at",)
    done_words: frozenset[str] = DONE_WORDS
    failed_words: frozenset[str] = FAILED_WORDS
    pending_words: frozenset[str] = PENDING_WORDS
    requires_output: bool = True
    poll_interval: float | None = None
    source: str = ""
    state_paths: tuple[Path, ...] | None = field(init=False, repr=False, compare=False)
    progress_path: Path | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        paths = None if self.state_at is None else tuple(parse_path(p) for p in self.state_at)
        object.__setattr__(self, "state_paths", paths)
        progress = parse_path(self.progress_at) if self.progress_at else None
        object.__setattr__(self, "progress_path", progress)

    @property
    def endpoint(self) -> str:
        return f"/{self.service}/tasks"

    @property
    def output_types(self) -> list[str]:
        """The kinds of artifact the service gives, in a stable order."""
        kinds = {spec.type for spec in self.outputs}
        return [kind for kind in OUTPUT_TYPES if kind in kinds]

    def state_words(self, record: dict[str, Any]) -> list[str]:
        """Every state word the record carries where this service keeps it, lower-cased."""
        if self.state_paths is None:
            return generic_state_words(record)
        words = []
        for path in self.state_paths:
            if _EACH not in path:  # the common case: a walk down dictionaries
                value: Any = record
                for step in path:
                    value = value.get(step) if isinstance(value, dict) else None
                if isinstance(value, str) and value:
                    words.append(value.lower())
                continue
            for value in read_path(record, path):
                if isinstance(value, str) and value:
                    words.append(value.lower())
        return words

    def read_outputs(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        """The artifacts the record holds, in one shape; each URL once."""
        if not self.outputs:
            return generic_outputs(record) if self.state_paths is None else []
        seen: set[str] = set()
        found = []
        for spec in self.outputs:
            for output in spec.read(record):
                if output["url"] not in seen:
                    seen.add(output["url"])
                    found.append(output)
        return found

    def read_progress(self, record: dict[str, Any]) -> int | None:
        """Progress 0-100 where the service reports one; over several items, the least."""
        if self.progress_path is None:
            return None
        values = [_percent(value) for value in read_path(record, self.progress_path)]
        known = [value for value in values if value is not None]
        return min(known) if known else None


# The generic rules, for a service without a profile: like AceData's SDK, every `state`
# or `status` string in `response` (or in the record when it has none), at any depth up
# to six levels, and the record's own top-level word.
_MAX_DEPTH = 6
_URL_TYPES: tuple[tuple[str, OutputType], ...] = (
    ("video", "video"),
    ("audio", "audio"),
    ("image", "image"),
    ("thumbnail", "image"),
)
_EXTENSIONS: tuple[tuple[tuple[str, ...], OutputType], ...] = (
    ((".mp4", ".mov", ".webm"), "video"),
    ((".mp3", ".wav", ".m4a", ".ogg", ".flac"), "audio"),
    ((".png", ".jpg", ".jpeg", ".webp", ".gif"), "image"),
)


def generic_state_words(record: dict[str, Any]) -> list[str]:
    response = record.get("response")
    words = list(_deep_words(record if response is None else response, 0))
    if response is not None:
        for key in ("state", "status"):
            value = record.get(key)
            if isinstance(value, str) and value:
                words.append(value.lower())
    return words


def _deep_words(node: Any, depth: int) -> Iterator[str]:
    if depth > _MAX_DEPTH:
        return
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("state", "status") and isinstance(value, str):
                yield value.lower()
            else:
                yield from _deep_words(value, depth + 1)
    elif isinstance(node, list):
        for item in node:
            yield from _deep_words(item, depth + 1)


def generic_outputs(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Every artifact URL in `response` (a string starting `http` under a key `url`,
    `*_url` or `*_urls`), typed by its key or its file name."""
    found: list[dict[str, Any]] = []
    response = record.get("response")
    if response is None:  # like the words: the record itself, but never its request
        response = {key: value for key, value in record.items() if key != "request"}
    _deep_urls(response, 0, found, set())
    return found


def _deep_urls(node: Any, depth: int, found: list[dict[str, Any]], seen: set[str]) -> None:
    if depth > _MAX_DEPTH:
        return
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str) and (key == "url" or key.endswith(("_url", "_urls"))):
                if _is_url(value) and value not in seen and "thumbnail" not in key:
                    seen.add(value)
                    found.append({"type": _url_type(key, value), "url": value})
            else:
                _deep_urls(value, depth + 1, found, seen)
    elif isinstance(node, list):
        for item in node:
            _deep_urls(item, depth + 1, found, seen)


def _url_type(key: str, url: str) -> OutputType:
    for word, kind in _URL_TYPES:
        if word in key:
            return kind
    path = url.split("?", 1)[0].lower()
    for extensions, kind in _EXTENSIONS:
        if path.endswith(extensions):
            return kind
    return "file"


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _percent(value: Any) -> int | None:
    """A progress value as 0-100: a number, or a string like `"100%"`."""
    if isinstance(value, str):
        value = value.strip().removesuffix("%")
    number = _number(value)
    if number is None or number != number:  # NaN
        return None
    return int(max(0.0, min(100.0, number)))
