"""The record shapes of AceData's other task services, as the simulator answers them.

Each family follows the vendor's example records (the tests keep copies in
`tests/support/upstream/services/` and check these shapes against them): where the
state word lives, what an in-flight record carries (Suno's streaming previews,
Midjourney's grids and progress), and what a finished one holds. A shape takes the
record's envelope (ids, times, request) and the task's phase, and fills in the rest.

    suno, producer         top-level `state` and songs in `response.data[]`, previews
                           (`audiopipe`) while running
    midjourney             no word: `progress` and intermediate grids until `finished_at`
    veo, sora, hailuo, ... one word per video in `response.data[].state`
    seedance, dreamina     `response.data.status` (an object)
    nano-banana, flux, ... no word: `success`, the images, `finished_at` (seedream and
                           fish: no `finished_at`)
    minimax                the task itself: `{"id", "status", "content": {"url"}}` (a batch
                           answer's item)
    maestro                top-level `status` and `progress.percent`
    captcha, digital-human a flat answer with a top-level word
    kling, wan             `response.state` like Luma, with their own done words
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tracker.devtools.simulator_records import SimulatedTask

CDN = "https://platform.cdn.acedata.cloud"
FAILURE = {"code": "generation_failed", "message": "The upstream could not generate this."}

# (record envelope, task, phase, share of the run done 0-1) -> record
Shape = Callable[[dict[str, Any], "SimulatedTask", str, float], dict[str, Any]]


def _settled(record: dict[str, Any], phase: str, finished_at: float | None) -> None:
    if phase in ("completed", "failed") and finished_at is not None:
        record["finished_at"] = finished_at


def song(service: str) -> Shape:
    def shape(
        record: dict[str, Any], task: SimulatedTask, phase: str, share: float
    ) -> dict[str, Any]:
        task_id = task.id
        ids = [f"{task_id[:8]}-song-{n}" for n in (1, 2)]
        image = [f"https://cdn2.suno.ai/image_{i}.jpeg" for i in ids]
        if phase == "failed":
            record["state"] = "failed"
            record["response"] = {"success": False, "task_id": task_id, "error": dict(FAILURE)}
            return record
        if phase == "completed":
            record["state"] = "complete"
            songs = [
                {
                    "id": i,
                    "title": "Simulated Song",
                    "image_url": image[n],
                    "audio_url": f"https://cdn1.suno.ai/{i}.mp3",
                    # Producer's documented songs have no video (`null`).
                    "video_url": f"https://cdn1.suno.ai/{i}.mp4" if service == "suno" else None,
                    "state": "succeeded",
                    "duration": round(task.duration, 2),
                }
                for n, i in enumerate(ids)
            ]
        else:
            word = "pending" if phase == "pending" else "running"
            record["state"] = "pending" if phase == "pending" else "processing"
            preview = phase == "processing"
            songs = [
                {
                    "id": i,
                    "title": "Simulated Song",
                    "image_url": image[n] if preview else "",
                    "audio_url": f"https://audiopipe.suno.ai/?item_id={i}" if preview else "",
                    "video_url": "",
                    "state": word,
                }
                for n, i in enumerate(ids)
            ]
            if service == "producer":
                for item in songs:
                    item["progress"] = f"{int(share * 100)}%"
        record["response"] = {"success": True, "task_id": task_id, "data": songs}
        return record

    return shape


def midjourney(
    record: dict[str, Any], task: SimulatedTask, phase: str, share: float
) -> dict[str, Any]:
    task_id = task.id
    if phase == "failed":
        record["response"] = {"success": False, "task_id": task_id, "error": dict(FAILURE)}
        return record
    done = phase == "completed"
    grid = f"https://midjourney.cdn.acedata.cloud/attachments/{task_id}/grid_0.webp"
    record["response"] = {
        "success": True,
        "task_id": task_id,
        "image_url": f"{CDN}/midjourney/{task_id}.png" if done else grid,
        "image_width": 1024 if done else 256,
        "image_height": 1024 if done else 256,
        "progress": 100 if done else min(99, int(share * 100)),
        "actions": ["upscale1", "upscale2", "upscale3"] if done else [],
    }
    return record


def per_video(done_word: str = "succeeded") -> Shape:
    def shape(
        record: dict[str, Any], task: SimulatedTask, phase: str, share: float
    ) -> dict[str, Any]:
        service, task_id = task.service, task.id
        word = {"pending": "pending", "processing": "processing", "failed": "failed"}.get(
            phase, done_word
        )
        video: dict[str, Any] = {"id": f"{task_id[:8]}-video", "state": word}
        if phase == "completed":
            video["video_url"] = f"{CDN}/{service}/{task_id}.mp4"
        response: dict[str, Any] = {"success": phase != "failed", "task_id": task_id}
        response["data"] = [video]
        if phase == "failed":
            response["error"] = dict(FAILURE)
        record["response"] = response
        return record

    return shape


def data_status(done_word: str) -> Shape:
    def shape(
        record: dict[str, Any], task: SimulatedTask, phase: str, share: float
    ) -> dict[str, Any]:
        service, task_id = task.service, task.id
        word = {"pending": "pending", "processing": "running", "failed": "failed"}.get(
            phase, done_word
        )
        data: dict[str, Any] = {"task_id": task_id, "status": word}
        if phase == "completed":
            data["video_url"] = f"{CDN}/{service}/{task_id}.mp4"
        response: dict[str, Any] = {"success": phase != "failed", "task_id": task_id, "data": data}
        if phase == "failed":
            response["error"] = dict(FAILURE)
        record["response"] = response
        return record

    return shape


def success_only(key: str, extension: str, *, finished_at: bool = True) -> Shape:
    def shape(
        record: dict[str, Any], task: SimulatedTask, phase: str, share: float
    ) -> dict[str, Any]:
        service, task_id = task.service, task.id
        if phase == "failed":
            record["response"] = {"success": False, "task_id": task_id, "error": dict(FAILURE)}
        elif phase == "completed":
            url = f"{CDN}/{service}/{task_id}.{extension}"
            record["response"] = {"success": True, "task_id": task_id, "data": [{key: url}]}
            if not finished_at:
                record.pop("finished_at", None)
        # In flight: no response (no document shows one).
        return record

    return shape


def minimax(
    record: dict[str, Any], task: SimulatedTask, phase: str, share: float
) -> dict[str, Any]:
    task_id = task.id
    word = {"pending": "queued", "processing": "running", "completed": "succeeded"}.get(
        phase, "failed"
    )
    # A batch answer's items are the task itself (a single retrieve wraps it in `task`).
    item: dict[str, Any] = {"id": task_id, "model": "MiniMax-H3", "status": word}
    if phase == "completed":
        item["content"] = {"url": f"https://cdn.acedata.cloud/minimax/{task_id}.mp4"}
    if phase == "failed":
        item["error"] = {"code": "1026", "message": "video description contains sensitive content"}
    return item


def maestro(
    record: dict[str, Any], task: SimulatedTask, phase: str, share: float
) -> dict[str, Any]:
    task_id = task.id
    word = {"pending": "pending", "processing": "producing", "completed": "succeeded"}.get(
        phase, "failed"
    )
    percent = 100 if phase == "completed" else int(share * 100)
    flat: dict[str, Any] = {
        "id": task_id,
        "started_at": record.get("created_at"),
        "finished_at": record.get("finished_at"),
        "status": word,
        "progress": {"percent": percent, "stage": word},
        "request": record.get("request"),
        "response": None,
    }
    if phase == "completed":
        flat["response"] = {
            "success": True,
            "data": {
                "variants": [
                    {"kind": "video", "title": "Simulated", "output_url": f"{CDN}/{task_id}.mp4"}
                ],
                "project": {"tarball_url": f"{CDN}/{task_id}.tar.gz"},
            },
        }
    elif phase == "failed":
        flat["response"] = {"success": False, "error": dict(FAILURE)}
    return flat


def captcha(
    record: dict[str, Any], task: SimulatedTask, phase: str, share: float
) -> dict[str, Any]:
    task_id = task.id
    word = {"completed": "ready", "failed": "failed"}.get(phase, "processing")
    flat: dict[str, Any] = {"success": phase != "failed", "id": task_id, "task_id": task_id}
    flat["status"] = word
    if phase == "completed":
        flat["token"] = f"03AFcWeA-{task_id[:8]}"
    if phase == "failed":
        flat.update(code="timeout", detail="The captcha task timed out.")
    _settled(flat, phase, record.get("finished_at"))
    return flat


def digital_human(
    record: dict[str, Any], task: SimulatedTask, phase: str, share: float
) -> dict[str, Any]:
    task_id = task.id
    word = {"completed": "succeed", "failed": "failed"}.get(phase, "pending")
    flat: dict[str, Any] = {"id": task_id, "task_id": task_id, "state": word}
    if phase == "completed":
        flat["video_url"] = f"{CDN}/digital-human/{task_id}.mp4"
    if phase == "failed":
        flat["error"] = dict(FAILURE)
    return flat


def word_in_response(done_word: str) -> Shape:
    def shape(
        record: dict[str, Any], task: SimulatedTask, phase: str, share: float
    ) -> dict[str, Any]:
        service, task_id = task.service, task.id
        word = {"completed": done_word}.get(phase, phase)
        response: dict[str, Any] = {"success": phase != "failed", "task_id": task_id}
        response["state"] = word
        if phase == "completed":
            response["video_url"] = f"{CDN}/{service}/{task_id}.mp4"
        if phase == "failed":
            response["error"] = dict(FAILURE)
        record["response"] = response
        return record

    return shape


def webextrator(
    record: dict[str, Any], task: SimulatedTask, phase: str, share: float
) -> dict[str, Any]:
    if phase == "completed":
        record["response"] = {"markdown": "# Simulated page", "url": "https://example.com/"}
    elif phase == "failed":
        record["response"] = {"success": False, "error": dict(FAILURE)}
    return record


# Shapes whose record is the answer itself (no envelope): they answer before a response too.
FLAT = frozenset({"minimax", "maestro", "captcha", "digital-human"})

FAMILIES: dict[str, Shape] = {
    "suno": song("suno"),
    "producer": song("producer"),
    "midjourney": midjourney,
    **{
        name: per_video()
        for name in ("veo", "sora", "hailuo", "grok", "gemini", "happyhorse", "pika", "pixverse")
    },
    "seedance": data_status("succeeded"),
    "dreamina": data_status("done"),
    "nano-banana": success_only("image_url", "png"),
    "flux": success_only("image_url", "png"),
    "openai": success_only("url", "png"),
    "seedream": success_only("image_url", "png", finished_at=False),
    "fish": success_only("audio_url", "mp3", finished_at=False),
    "minimax": minimax,
    "maestro": maestro,
    "captcha": captcha,
    "digital-human": digital_human,
    "kling": word_in_response("succeed"),
    "wan": word_in_response("completed"),
    "webextrator": webextrator,
}
