"""``timi app`` under load: how many runs may wait, per client and in all, and whether a running
run's client is still there.

Gradio's queue has one size for every event, so a few dozen queued runs (each up to
``--max-run-seconds``) would fill it and refuse everything else, picture uploads included.
:class:`RunQueueLimit` (an ASGI middleware in front of Gradio's app) refuses a run's
``queue/join`` with HTTP 429 and one line when its session already has ``per_client`` runs queued
or running, or ``max_queued`` runs already wait; every other request passes untouched. The queue
itself is sized from these (:func:`queue_size`), so the cheap mask events always find room.

Both read Gradio's queue (``Blocks._queue``: its waiting events per concurrency id and its active
jobs): Gradio has no public API for either; the tests in ``tests/test_app_load.py`` pin the behaviour.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

__all__ = ["RUN_ID", "CHEAP_EVENTS", "RunLimits", "RunQueueLimit", "queue_size", "client_gone"]

#: The run button's concurrency id (one run at a time).
RUN_ID = "timi-run"
#: Room in Gradio's queue for the page's cheap events (picture upload, mask edits) beside the runs.
CHEAP_EVENTS = 32


def queue_size(max_queued: int) -> int:
    """Gradio's ``max_size``: the waiting runs plus room for the cheap events."""
    return max_queued + CHEAP_EVENTS


def _run_events(blocks):
    """(waiting run events, running run events) of Gradio's queue."""
    queue = getattr(blocks, "_queue", None)
    waiting = getattr(getattr(queue, "event_queue_per_concurrency_id", {}).get(RUN_ID), "queue", [])
    running = [e for job in (getattr(queue, "active_jobs", None) or []) if job for e in job
               if getattr(e, "concurrency_id", None) == RUN_ID]
    return list(waiting), running


def client_gone(blocks, session_hash) -> bool:
    """Whether the run of ``session_hash`` lost its client (Gradio marks a running event not alive
    when its event stream closes)."""
    _, running = _run_events(blocks)
    return any(e.session_hash == session_hash and not getattr(e, "alive", True) for e in running)


@dataclasses.dataclass
class RunLimits:
    blocks: object                      # the page (gr.Blocks), its queue read at each join
    run_fn: int                         # the run button's function index
    per_client: int = 2                 # runs queued or running per session
    max_queued: int = 4                 # runs waiting, all sessions together

    @staticmethod
    def _data(body: bytes) -> dict:
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            return {}                   # Gradio answers malformed bodies itself
        return data if isinstance(data, dict) else {}

    def is_run(self, body: bytes) -> bool:
        """Whether this ``queue/join`` body asks for a run."""
        return self._data(body).get("fn_index") == self.run_fn

    def refusal(self, body: bytes):
        """The line refusing this run's ``queue/join`` body, or None to let it in."""
        data = self._data(body)
        waiting, running = _run_events(self.blocks)
        session = data.get("session_hash")
        mine = sum(e.session_hash == session for e in waiting + running)
        if mine >= self.per_client:
            return (f"error: this page already has {mine} run(s) queued or running (at most {self.per_client} "
                    "per page); wait for them to finish.")
        if len(waiting) >= self.max_queued:
            return f"error: {len(waiting)} runs are already waiting (this server's limit); try again later."
        return None


class RunQueueLimit:
    """ASGI middleware: :meth:`RunLimits.refusal` on each ``POST .../queue/join`` (429 and the line
    as Gradio's ``detail``); the body is handed on unchanged otherwise."""

    def __init__(self, app, limits: RunLimits):
        self.app, self.limits = app, limits
        self.lock = asyncio.Lock()      # a run's join counts and enters the queue before the next is counted

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope["path"].endswith("/queue/join"):
            return await self.app(scope, receive, send)
        messages, body = [], b""
        while True:
            msg = await receive()
            messages.append(msg)
            body += msg.get("body", b"")
            if msg["type"] != "http.request" or not msg.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        if not self.limits.is_run(body):
            return await self.app(scope, replay, send)
        async with self.lock:
            line = self.limits.refusal(body)
            if line is None:
                return await self.app(scope, replay, send)
        payload = json.dumps({"detail": line}).encode()
        await send({"type": "http.response.start", "status": 429,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
