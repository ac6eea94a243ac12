"""Every AceData task service the tracker knows, one declarative entry each.

Adding a service is adding an entry here and its example records to the tests
(`tests/support/upstream/services/`). The sources of each entry (the vendor's
task page, its web client, its MCP server) are summed up in docs/architecture.md.
"""

from __future__ import annotations

from tracker.profiles.model import (
    DONE_WORDS,
    FAILED_WORDS,
    PENDING_WORDS,
    OutputSpec,
    Profile,
)

# Seconds between polls of a fresh task where the vendor advises a pace: songs and
# minute-scale videos need not be asked every 5 s ("music 5-10 s", "video 10-15 s",
# "minute-scale videos every 10-30 s"; MiniMax "about every 10 s", Maestro "5-10 s").
SONG_PACE = 10.0
VIDEO_PACE = 10.0

_DATA_VIDEO = OutputSpec(
    "video", "response.data[]", "video_url", thumbnail_url="image_url", duration="duration"
)
_DATA_IMAGE = OutputSpec("image", "response.data[]", "image_url")
_SONG = (
    OutputSpec(
        "audio",
        "response.data[]",
        "audio_url",
        thumbnail_url="image_url",
        duration="duration",
        title="title",
    ),
    OutputSpec("video", "response.data[]", "video_url", thumbnail_url="image_url", title="title"),
    OutputSpec("file", "response.data[]", "stems_url", title="title"),
)
# Suno and Producer: AceData's clients read a word at the record's top level, the
# documents one per song; in flight, songs carry streaming previews (`audiopipe` URLs).
_SONG_STATES = ("state", "response.state", "response.data[].state")
_PER_ITEM = ("response.data[].state",)

PROFILES: tuple[Profile, ...] = (
    Profile(
        "luma",
        ("response.state",),
        (
            OutputSpec(
                "video",
                "response",
                "video_url",
                thumbnail_url="thumbnail_url",
                width="video_width",
                height="video_height",
            ),
        ),
        source="task page; words pending/processing/failed from AceData's clients",
    ),
    Profile(
        "suno",
        _SONG_STATES,
        _SONG,
        progress_at="response.data[].progress",
        poll_interval=SONG_PACE,
        source="task page, audios page (streaming), MCP (top-level state)",
    ),
    Profile(
        "producer",
        _SONG_STATES,
        _SONG,
        progress_at="response.data[].progress",
        poll_interval=SONG_PACE,
        source="task page, audios page; MCP (top-level state, previews)",
    ),
    Profile(
        "midjourney",
        (),
        (OutputSpec("image", "response", "image_url", width="image_width", height="image_height"),),
        progress_at="response.progress",
        source="task page: no state word; progress 0-100 with intermediate images",
    ),
    Profile(
        "kling",
        ("response.state",),
        (OutputSpec("video", "response", "video_url", duration="duration"),),
        poll_interval=VIDEO_PACE,
        source="task page (`succeed`); web client (failed, cancelled)",
    ),
    *(
        Profile(
            name,
            _PER_ITEM,
            (_DATA_VIDEO,),
            finish=("finished_at", "success"),
            poll_interval=VIDEO_PACE,
            source=source,
        )
        for name, source in (
            ("veo", "task page: per-video state, no finished_at"),
            ("sora", "task page: per-video state, no finished_at"),
            ("hailuo", "task page: per-video state"),
            ("grok", "task page: per-video state"),
            ("gemini", "task page: per-video state"),
            ("happyhorse", "task page: per-video state"),
            ("pika", "no vendor page; web client: per-video state, success + video_url"),
            ("pixverse", "no vendor page; web client: per-video state, success + data"),
        )
    ),
    Profile(
        "seedance",
        ("response.data.status",),
        (
            OutputSpec(
                "video",
                "response.data",
                "video_url",
                thumbnail_url="last_frame_url",
                duration="duration",
            ),
        ),
        finish=("finished_at", "success"),
        poll_interval=VIDEO_PACE,
        source="task page: `response.data` is an object with `status`",
    ),
    Profile(
        "dreamina",
        ("response.data.status",),
        (
            OutputSpec("video", "response.data", "video_url", thumbnail_url="image_url"),
            OutputSpec("audio", "response.data", "audio_url"),
        ),
        done_words=DONE_WORDS | {"done"},
        poll_interval=VIDEO_PACE,
        source="task page: `response.data.status` `done`",
    ),
    Profile(
        "wan",
        ("response.state",),
        (OutputSpec("video", "response", "video_url"),),
        poll_interval=VIDEO_PACE,
        source="task page; web client (queued, processing, cancelled)",
    ),
    *(
        Profile(
            name,
            (),
            (_DATA_IMAGE, OutputSpec("video", "response.data[]", "video_url")),
            source=source,
        )
        for name, source in (
            ("nano-banana", "task page: no word; finished_at, success, data[].image_url"),
            ("flux", "task page: no word; finished_at, success, data[].image_url"),
        )
    ),
    Profile(
        "seedream",
        (),
        (_DATA_IMAGE,),
        finish=("finished_at", "success"),
        source="task page: no word, no finished_at; success and data[].image_url",
    ),
    Profile(
        "fish",
        ("state", "response.state"),
        (
            OutputSpec("audio", "response.data[]", "audio_url"),
            OutputSpec("audio", "response", "audio_url"),
        ),
        finish=("finished_at", "success"),
        source="task page: no word, no finished_at; MCP words pending/processing/complete",
    ),
    Profile(
        "minimax",
        ("task.status", "status"),
        (
            OutputSpec("video", "task.content", "url"),
            OutputSpec("video", "content", "url"),
        ),
        failed_words=frozenset({"failed", "cancelled", "canceled"}),
        poll_interval=10.0,
        source="task page: `{task: {status}}`; batch items are the task itself",
    ),
    Profile(
        "maestro",
        ("status",),
        (
            OutputSpec("video", "response.data.variants[]", "output_url", title="title"),
            OutputSpec("file", "response.data.project", "tarball_url"),
        ),
        progress_at="progress.percent",
        failed_words=FAILED_WORDS | {"dead"},
        pending_words=PENDING_WORDS,
        poll_interval=10.0,
        source="task page: top-level status and progress.percent; MCP (dead, canceled)",
    ),
    Profile(
        "captcha",
        ("status",),
        (),
        done_words=frozenset({"ready"}),
        failed_words=frozenset({"failed"}),
        requires_output=False,
        source="task page: flat answer, status processing/ready/failed; result is a token",
    ),
    Profile(
        "digital-human",
        ("state", "status", "response.state"),
        (
            OutputSpec("video", "", "video_url"),
            OutputSpec("video", "response", "video_url"),
        ),
        done_words=frozenset({"succeed", "succeeded", "success", "completed"}),
        failed_words=frozenset({"failed", "error", "cancelled", "canceled", "dead"}),
        finish=("finished_at", "success"),
        poll_interval=VIDEO_PACE,
        source="no English page; MCP (flat state) and web client (status, response.state)",
    ),
    Profile(
        "openai",
        (),
        (OutputSpec("image", "response.data[]", "url"),),
        source="task page: no word; finished_at; data[].url",
    ),
    Profile(
        "webextrator",
        (),
        (),
        requires_output=False,
        source="task page: no word; finished_at; the result is `response` itself",
    ),
)
