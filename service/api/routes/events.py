"""/v1/jobs/{id}/events: a job's history as JSON, or as server-sent events that follow the job until it ends.

Fifty streams from one tenant used to hang the whole API (each held a pooled DB connection for its
lifetime and polled the store synchronously on the event loop). Now:
- the route is sync (a worker thread) and hands its request's connection back before streaming starts;
- each stream polls with a short session per poll on its own small thread pool (EVENT_STREAM_DB_THREADS),
  so the event loop never waits on the store and streams cannot take the threads other requests need;
- a tenant's open streams are capped (EVENT_STREAMS_PER_TENANT; 429 + Retry-After beyond);
- a stream ends after EVENT_STREAM_IDLE_S without a new event and after EVENT_STREAM_MAX_S in all; the
  client reconnects with Last-Event-ID (browsers do so by themselves) and gets only what it missed.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, HTTPException, Request, status
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service import crud
from service.api.deps import SessionDep, TenantDep
from service.api.errors import error_responses
from service.api.limits import StreamSlot
from service.api.routes.jobs import job_or_404
from service.db import Job
from service.schemas import TERMINAL_STATES, JobEventPublic, JobState
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)
KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from cutting a quiet stream
MAX_EVENTS_PER_POLL = 500  # bounds one poll's memory; the rest comes with the next poll
RECONNECT_MS = 3000  # the SSE `retry:` hint sent first
STREAM_CAP_RETRY_AFTER_S = 10

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_SSE_200: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON: every event so far. With `Accept: text/event-stream`: server-sent events (`id`, "
        "`event` = kind, `data` = the event as JSON) until the job ends, the stream idles or reaches its lifetime",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}


def _poll(make_session: sessionmaker[Session], job_id: str, after: int) -> tuple[list[JobEventPublic], bool]:
    """(events after `after`, whether the job has ended and nothing more will come), on a short session."""
    with make_session() as s:
        rows = crud.events_after(s, job_id, after, limit=MAX_EVENTS_PER_POLL)
        events = [JobEventPublic.model_validate(e, from_attributes=True) for e in rows]
        job = s.get(Job, job_id)
        ended = job is None or JobState(job.state) in TERMINAL_STATES
    return events, ended and len(rows) < MAX_EVENTS_PER_POLL


async def _stream(
    make_session: sessionmaker[Session],
    threads: anyio.CapacityLimiter,
    job_id: str,
    after: int,
    settings: Settings,
    slot: StreamSlot,
) -> AsyncIterator[str]:
    try:
        started = last_event = last_write = time.monotonic()
        yield f"retry: {RECONNECT_MS}\n\n"
        while True:
            try:
                events, ended = await anyio.to_thread.run_sync(_poll, make_session, job_id, after, limiter=threads)
            except SQLAlchemyError as exc:  # the store is busy or down: end the stream, the client reconnects later
                log.warning("event stream of job %s ended: %s", job_id, type(exc).__name__)
                return
            now = time.monotonic()
            for e in events:
                after = e.id
                yield f"id: {e.id}\nevent: {e.kind}\ndata: {e.model_dump_json()}\n\n"
            if events:
                last_event = last_write = now
            if (
                ended
                or now - last_event >= settings.EVENT_STREAM_IDLE_S
                or now - started >= settings.EVENT_STREAM_MAX_S
            ):
                return
            if now - last_write >= KEEPALIVE_S:
                yield ": keep-alive\n\n"
                last_write = now
            await anyio.sleep(settings.EVENT_STREAM_POLL_S)
    finally:  # also on cancellation, which is how a client's disconnect arrives here
        slot.release()


@router.get(
    "/{job_id}/events", response_model=list[JobEventPublic], responses=_SSE_200 | error_responses(401, 404, 429, 503)
)
def read_events(
    job_id: str,
    request: Request,
    session: SessionDep,
    tenant: TenantDep,
    last_event_id: Annotated[
        int | None, Header(ge=0, le=2**63 - 1, description="resume after this event id (SSE reconnect)")
    ] = None,
) -> Any:
    """The job's history; with `Accept: text/event-stream`, history then live events until the job ends."""
    job = job_or_404(session, tenant, job_id)
    after = last_event_id or 0
    if "text/event-stream" not in request.headers.get("accept", ""):
        return [
            JobEventPublic.model_validate(e, from_attributes=True) for e in crud.events_after(session, job.id, after)
        ]
    session.close()  # the request's connection goes back to the pool now, not when the stream ends
    state = request.app.state
    slot = state.event_streams.acquire(tenant)
    if slot is None:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"at most {state.event_streams.per_tenant} open event streams per tenant",
            {"Retry-After": str(STREAM_CAP_RETRY_AFTER_S)},
        )
    stream = _stream(state.sessionmaker, state.event_stream_threads, job.id, after, get_settings(), slot)
    # A stream whose client left before it started never runs its `finally`: free the slot when it is dropped.
    weakref.finalize(stream, slot.release)
    return StreamingResponse(
        stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
