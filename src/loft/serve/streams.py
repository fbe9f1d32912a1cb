"""The streams under one generation request: a cancel flag shared by its n choices, the choices
run concurrently into one ordered feed, the client's disconnect noticed while they run, and the
server-sent-events response that always closes the request's books."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from loft.serve.types import Delta, Engine, SamplingParams, Target

DISCONNECT_POLL_S = 0.25


class CancelGroup(threading.Event):
    """The request's cancel flag; ``child()`` gives each choice its own event, set with it.

    Engines may set the event they were given when their stream ends, so n choices must not
    share one.
    """

    def __init__(self) -> None:
        super().__init__()
        self._children: list[threading.Event] = []

    def child(self) -> threading.Event:
        event = threading.Event()
        self._children.append(event)
        if self.is_set():
            event.set()
        return event

    def set(self) -> None:
        super().set()
        for event in self._children:
            event.set()


async def choices(
    engine: Engine,
    target: Target,
    prompt_ids: list[int],
    params: list[SamplingParams],
    cancel: CancelGroup,
) -> AsyncIterator[tuple[int, Delta]]:
    """Run one ``generate`` stream per choice concurrently; yield (choice index, delta)."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    end = object()

    async def pump(i: int, p: SamplingParams) -> None:
        stream = engine.generate(target, prompt_ids, p, cancel.child())
        try:
            async for delta in stream:
                queue.put_nowait((i, delta))
            queue.put_nowait((i, end))
        except Exception as e:
            queue.put_nowait((i, e))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(params)]
    remaining = len(tasks)
    try:
        while remaining:
            try:
                i, item = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_POLL_S)
            except TimeoutError:
                if cancel.is_set():  # client gone: an engine need not end a cancelled stream
                    return
                continue
            if item is end:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        if remaining:
            cancel.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def watch_disconnect(request: Request, cancel: threading.Event) -> None:
    while not cancel.is_set():
        if await request.is_disconnected():
            cancel.set()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always runs ``on_close``, even when never iterated."""

    def __init__(self, content: AsyncIterator[str], on_close: Any, headers: dict[str, str]):
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


def sse(doc: dict[str, Any] | str) -> str:
    return f"data: {doc if isinstance(doc, str) else json.dumps(doc, ensure_ascii=False)}\n\n"


__all__ = ["DISCONNECT_POLL_S", "CancelGroup", "SSEResponse", "choices", "sse", "watch_disconnect"]
