"""Reading request bodies within their limit, and dropping the rest of one that is refused."""

from __future__ import annotations

from starlette.requests import ClientDisconnect, Request

from broker.errors import PayloadTooLarge

DISCARD_MAX_BYTES = 64 * 1024 * 1024  # how much of a refused body is read (and dropped) so clients read the 413


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (before reading it all when declared)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        await discard_body(request)
        raise PayloadTooLarge(f"the request body is {declared} bytes; the limit is {limit}")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            await discard_body(request, started=True)
            raise PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def discard_body(request: Request, started: bool = False) -> None:
    """Read what is left of a body being refused (`started`: some of it was read), up to DISCARD_MAX_BYTES.

    A client still sending when the server answers and closes (urllib, http.client, requests)
    gets a connection reset instead of the answer; reading the rest first lets it read the 413.
    A client waiting for `100 Continue` has sent nothing yet: it is answered at once (reading
    would ask it for the body).
    """
    if not started and request.headers.get("expect", "").lower() == "100-continue":
        return
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > DISCARD_MAX_BYTES:
        return  # too much to read for nothing: this client gets the reset
    dropped = 0
    try:
        async for chunk in request.stream():
            dropped += len(chunk)
            if dropped > DISCARD_MAX_BYTES:
                return
    except (ClientDisconnect, RuntimeError):  # gone, or the stream was already read to its end
        return
