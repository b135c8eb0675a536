"""A TCP proxy in front of a real service, to cut it off, bring it back, or slow it down."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; ``cut()`` drops everything, ``restore()`` resumes."""

    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = port
        self.downstream_delay_s = 0.0
        self.connections = 0  # accepted so far
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._target_url = f"tcp://{target_host}:{target_port}"

    @classmethod
    def in_front_of(cls, url: str, port: int = 0) -> TcpProxy:
        """A proxy for the service at ``url`` (``amqp://…``, ``smtp://…``); :meth:`url` is
        the same URL through the proxy."""
        target = urlsplit(url)
        proxy = cls(target.hostname or "127.0.0.1", target.port or 5672, port=port)
        proxy._target_url = url
        return proxy

    def url(self) -> str:
        """The target's URL with this proxy's address (once started, or on a fixed port)."""
        parts = urlsplit(self._target_url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@" if credentials else ""
        return urlunsplit(parts._replace(netloc=f"{netloc}127.0.0.1:{self.port}"))

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Stop listening and drop every open connection, as a dead broker would."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        self._writers.clear()

    def cutter(self, pause_s: float = 0.5) -> Callable[[], Awaitable[None]]:
        """For another thread's loop (an SMTP sink's hook): cut this proxy on the loop that
        calls this, then wait ``pause_s`` (so the client notices before that hook returns)."""
        loop = asyncio.get_running_loop()

        async def cut_from_another_thread() -> None:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.cut(), loop))
            await asyncio.sleep(pause_s)

        return cut_from_another_thread

    async def restore(self) -> None:
        await self.start()

    def freeze(self) -> None:
        """Keep every connection open but pass nothing either way: a hung broker."""
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        await self.cut()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        tasks = [
            asyncio.create_task(self._pipe(reader, up_writer, 0.0)),
            asyncio.create_task(self._pipe(up_reader, writer, None)),
        ]
        self._tasks.update(tasks)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
                self._tasks.discard(task)
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float | None
    ) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                wait = self.downstream_delay_s if delay_s is None else delay_s
                if wait:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
