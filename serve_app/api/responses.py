"""HTTP answers more than one API family gives: a job accepted (202), a stream of server-sent events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from ..job_queue.records import JobRecord, JobStatus
from .jobs.protocol import JobView


def accepted(record: JobRecord) -> JSONResponse:
    """202 for a job just submitted: its view, with Location naming it."""
    view = JobView.of(record, {"status": JobStatus.queued})
    return JSONResponse(view.model_dump(mode="json"), status_code=202, headers={"Location": view.urls["self"]})


def event_stream(events: AsyncIterator[dict]) -> StreamingResponse:
    """`{"event", "data"}` items as text/event-stream."""

    async def lines():
        async for event in events:
            yield f"event: {event['event']}\ndata: {json.dumps(event['data'])}\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
