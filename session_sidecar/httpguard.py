"""uvicorn's httptools protocol with the bounds it lacks, so that no client holds the
service's memory, descriptors or event loop by sending, or reading, too slowly or too much
(docs/operations.md, "Clients").

* A request head (request line and headers) may take at most HEAD_MAX_BYTES; past it the
  client gets a 400 and the connection closes. httptools has no limit of its own, and the
  pieces of a header are joined as they arrive, in time that grows with the square of its
  size: one 40 MB header held the event loop for 1.7 s. (uvicorn's pure-Python h11 parser
  has such a limit, `h11_max_incomplete_event_size`, which `cli.py` sets alike.)
* A request head must be complete within HEAD_TIMEOUT_S of the connection's opening, or of
  its first byte on a connection kept alive: a connection that sends nothing, or trickles
  its head, is closed. uvicorn itself times only the idle wait between requests.
* A client that leaves the response unread while there is more to send (a stream it never
  reads) is dropped after WRITE_STALL_S (`abort`: what uvicorn still buffers for it is
  discarded): its request ends, which frees its stream slot, and so does its descriptor,
  which a plain close would keep until the unread bytes were taken.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEAD_MAX_BYTES = 64 * 1024  # twice what nginx passes by default (large_client_header_buffers 4 8k)
HEAD_TIMEOUT_S = 10.0
WRITE_STALL_S = 60.0  # nginx's send_timeout


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._open_requests = 0  # heads complete, responses not yet
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self._open_requests == 0:
            self._await_head()  # the first bytes of the next request on a kept-alive connection
        if self._head_timer is not None:
            self._head_bytes += len(data)
        super().data_received(data)
        # Checked after parsing: while the head is incomplete, every byte so far belongs to it.
        if self._head_timer is not None and self._head_bytes > HEAD_MAX_BYTES:
            self._cancel_head()
            if not self.transport.is_closing():
                self.send_400_response("Request head too large.")

    def on_headers_complete(self) -> None:
        self._cancel_head()
        self._open_requests += 1
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        self._open_requests -= 1
        super().on_response_complete()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(WRITE_STALL_S, self.transport.abort)

    def resume_writing(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        super().resume_writing()

    def _await_head(self) -> None:
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_too_slow)

    def _cancel_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()
