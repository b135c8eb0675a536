"""The event loop every process of the project runs on.

uvloop (libuv) where it is installed, which is every Linux and macOS install of the
project: the ingress and the workers spend most of their CPU in socket I/O and callbacks,
which uvloop does for a fraction of the standard loop's cost. ``EVENT_LOOP=asyncio`` picks
the standard library's loop instead (to rule uvloop out when chasing a problem).
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import platform
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from shared.errors import ConfigError
from shared.settings import Env, env_str

T = TypeVar("T")


def loop_factory(env: Env | None = None) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop constructor ``EVENT_LOOP`` asks for; ``None`` means asyncio's default."""
    env = os.environ if env is None else env
    choice = env_str(env, "EVENT_LOOP", "auto").lower()
    if choice not in ("auto", "uvloop", "asyncio"):
        raise ConfigError(f"EVENT_LOOP must be auto, uvloop or asyncio, got {choice!r}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("EVENT_LOOP=uvloop, but uvloop is not installed") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], *, env: Env | None = None) -> T:
    """``asyncio.run`` on the loop ``EVENT_LOOP`` picks."""
    try:
        factory = loop_factory(env)
    except ConfigError:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


# SIGHUP too: a terminal closing on a foreground run (its default action would end the
# process at once, with no drain, and `up`'s children, in sessions of their own, with it)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# How long a service may take to exit once its loop is closed before it is ended for good
# (tracebacks of every thread on stderr, exit 1): ignoring stop signals must not turn a
# stuck exit into one only SIGKILL ends. A normal exit takes milliseconds.
EXIT_WATCHDOG_S = 10


class StopRequest(asyncio.Event):
    """Set by a stop signal; ``signal`` says which one came first (None while unset)."""

    def __init__(self) -> None:
        super().__init__()
        self.signal: int | None = None

    @property
    def exit_code(self) -> int:
        """What a command ended by this request exits with, by the shell's convention
        (128 + the signal's number: 130 for Ctrl-C)."""
        return 128 + (self.signal or signal.SIGINT)


def stop_requested(*, ignore_for_s: float = 0.0) -> StopRequest:
    """An event set by SIGTERM or SIGINT, through the running loop's signal handlers
    (replacing earlier ones); a signal within ``ignore_for_s`` from now does not count."""
    stop = StopRequest()
    loop = asyncio.get_running_loop()
    counts_from = loop.time() + ignore_for_s

    def on_signal(sig: int) -> None:
        if loop.time() >= counts_from and not stop.is_set():
            stop.signal = sig
            stop.set()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    return stop


# How long a stop waits for cancelled work to unwind (a broker connection closing through a
# network that no longer answers would otherwise hold the exit forever).
CANCEL_WAIT_S = 5.0


async def unless_stopped(work: Coroutine[Any, Any, T], stopping: asyncio.Event) -> T | None:
    """``work``'s result, or None once ``stopping`` is set first: ``work`` is then cancelled,
    given ``CANCEL_WAIT_S`` to unwind, and whatever it raises on the way out is dropped (we
    are stopping)."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task}, timeout=CANCEL_WAIT_S)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: dropped, not logged as never retrieved
    return None


def run_service(main: Coroutine[Any, Any, T], *, env: Env | None = None) -> T:
    """:func:`run` for a service that stops gracefully on :func:`stop_requested`.

    Once its stop is done and the loop is closed, a further SIGTERM or SIGINT is ignored
    while the process exits: closing an asyncio loop, or finalizing the interpreter after
    a uvloop one, puts the default actions back, and a supervisor's follow-up signal
    (``fulfillment up`` sends SIGTERM to its children after a Ctrl-C reached the whole
    group) would otherwise turn a clean exit 0 into death by signal. A watchdog bounds
    that last stretch.
    """
    result = run(main, env=env)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    faulthandler.dump_traceback_later(EXIT_WATCHDOG_S, exit=True)
    return result


# How long our HTTP servers (the ingress, a worker's /metrics) keep a connection that sends
# nothing, even before its first request. aiohttp's default is an hour: a few thousand idle
# sockets would use up a process's descriptors. 75 s is longer than load balancers keep
# idle upstream connections (ALB and nginx: 60 s), so the balancer closes first and never
# reuses one we are closing.
HTTP_KEEPALIVE_S = 75.0


def interpreter() -> str:
    """Which Python runs this, for benchmark output: its build matters as much as our code
    (an unoptimized build, pyenv's default, ran the ingress a fifth slower than a PGO+LTO one)."""
    return f"{platform.python_implementation()} {platform.python_version()} from {sys.base_prefix}"


def loop_name() -> str:
    """The running loop's kind, for start-up logs and benchmark output."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
