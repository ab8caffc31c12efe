"""A fault-injecting TCP proxy on loopback, between the service and a real Redis.

Every connection is pumped chunk by chunk in both directions; the fault in force
when a chunk is delivered decides what happens to it:

* `latency(s)`: each reply chunk is delivered `s` seconds after it arrived
  (order kept, so a slow reply never overtakes an earlier one);
* `stall`: half of a reply chunk is delivered, then nothing more until the fault
  ends, when the rest follows (TCP would deliver it late, not lose it);
* `reset`: half of a reply chunk is delivered, then both sides are reset (RST);
* `blackhole`: connections are accepted, nothing is delivered either way until
  the fault ends (a partition that heals).

Reply chunks carry whole pipelines' answers, so a cut half-way lands inside a
pipelined reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import time


class Fault(enum.Enum):
    NONE = "none"
    LATENCY = "latency"
    STALL = "stall"
    RESET = "reset"
    BLACKHOLE = "blackhole"


class _Reset(Exception):
    """Raised inside a pump to tear its connection down with RST."""


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1"):
        self._upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.fault = Fault.NONE
        self.latency_s = 0.0
        self._healed = asyncio.Event()
        self._healed.set()
        self.port = 0
        self.resets = 0
        self.peak = 0  # the most connections open through the proxy at once

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def set(self, fault: Fault, latency_s: float = 0.0) -> None:
        self.fault = fault
        self.latency_s = latency_s
        if fault in (Fault.STALL, Fault.BLACKHOLE):
            self._healed.clear()
        else:
            self._healed.set()

    def heal(self) -> None:
        self.set(Fault.NONE)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._serve(reader, writer))
        self._connections.add(task)
        self.peak = max(self.peak, len(self._connections))
        task.add_done_callback(self._connections.discard)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        upstream_w: asyncio.StreamWriter | None = None
        try:
            if self.fault is Fault.BLACKHOLE:
                await self._healed.wait()  # accepted, never answered while the fault lasts
            upstream_r, upstream_w = await asyncio.open_connection(*self._upstream)
            pumps = [
                asyncio.create_task(self._pump(client_r, upstream_w, reply=False)),
                asyncio.create_task(self._pump(upstream_r, client_w, reply=True)),
            ]
            try:
                done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                for pump in done:
                    pump.result()
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except _Reset:
            self.resets += 1
            _abort(client_w)
            if upstream_w is not None:
                _abort(upstream_w)
            return
        except OSError:
            pass
        for writer in (client_w, upstream_w):
            if writer is not None:
                writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, reply: bool) -> None:
        """Read chunks as they come; deliver each when the fault in force allows. Ends at EOF."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            try:
                while chunk := await reader.read(65536):
                    delay = self.latency_s if reply and self.fault is Fault.LATENCY else 0.0
                    queue.put_nowait((time.monotonic() + delay, chunk))
            except OSError:
                pass
            finally:
                queue.put_nowait((time.monotonic(), b""))  # end of stream, after what was read

        reading = asyncio.create_task(read())
        try:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    return
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if self.fault is Fault.BLACKHOLE:
                    await self._healed.wait()
                elif reply and self.fault in (Fault.STALL, Fault.RESET):
                    half = len(chunk) // 2
                    writer.write(chunk[:half])
                    await writer.drain()
                    if self.fault is Fault.RESET:
                        raise _Reset
                    await self._healed.wait()
                    chunk = chunk[half:]
                writer.write(chunk)
                await writer.drain()
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST, not FIN: linger on, timeout zero."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
