"""``EVENT_LOOP``: which event loop every process of the project runs on."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import warnings

import pytest

from shared import runtime
from shared.errors import ConfigError
from tests.processes import run_fulfillment


async def running_loop() -> tuple[str, str]:
    loop = asyncio.get_running_loop()
    return runtime.loop_name(), type(loop).__module__


def test_by_default_every_process_runs_on_uvloop() -> None:
    name, module = runtime.run(running_loop(), env={})
    assert name == "uvloop"
    assert module.startswith("uvloop")


@pytest.mark.parametrize("value", ["asyncio", "ASYNCIO"])
def test_event_loop_asyncio_picks_the_standard_library_loop(value: str) -> None:
    name, module = runtime.run(running_loop(), env={"EVENT_LOOP": value})
    assert name == "asyncio"
    assert module.startswith("asyncio")


def test_event_loop_uvloop_picks_uvloop() -> None:
    assert runtime.run(running_loop(), env={"EVENT_LOOP": "uvloop"})[0] == "uvloop"


def test_a_bad_event_loop_value_stops_with_an_error_naming_the_variable_and_runs_nothing() -> None:
    ran = []

    async def main() -> None:
        ran.append(True)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine was never awaited" would be a leak
        with pytest.raises(ConfigError, match="EVENT_LOOP") as caught:
            runtime.run(main(), env={"EVENT_LOOP": "trio"})
    assert "'trio'" in str(caught.value)
    assert ran == []


def test_without_uvloop_installed_auto_falls_back_and_an_explicit_choice_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert runtime.run(running_loop(), env={})[0] == "asyncio"
    with pytest.raises(ConfigError, match="EVENT_LOOP=uvloop, but uvloop is not installed"):
        runtime.loop_factory({"EVENT_LOOP": "uvloop"})


def test_the_cli_refuses_a_bad_event_loop_with_a_message_naming_the_variable() -> None:
    result = run_fulfillment("topology", env={**os.environ, "EVENT_LOOP": "gevent"})
    assert result.returncode == 2
    assert "EVENT_LOOP must be auto, uvloop or asyncio, got 'gevent'" in result.stderr
    assert "Traceback" not in result.stderr


async def test_in_process_tests_run_on_the_loop_the_processes_run_on() -> None:
    expected = "asyncio" if os.environ.get("EVENT_LOOP", "").lower() == "asyncio" else "uvloop"
    assert runtime.loop_name() == expected


FOLLOW_UP_SIGNAL = """
import os, signal, sys, time
from shared import runtime

async def main() -> int:
    runtime.stop_requested()  # the loop's handlers, as every service installs them
    return 0

class FollowUp:
    # A supervisor's follow-up signal, arriving while the interpreter finalizes: CPython
    # then puts the default action back for handlers set from Python (the loop's are).
    # (Everything it needs is bound now: module globals are gone by then.)
    def __init__(self, sig: int) -> None:
        self.sig, self.pid, self.kill, self.write = sig, os.getpid(), os.kill, os.write

    def __del__(self) -> None:
        self.kill(self.pid, self.sig)
        self.write(1, b"exited on our own\\n")

runtime.EXIT_WATCHDOG_S = 1
getattr(runtime, sys.argv[1])(main())
if len(sys.argv) > 3:
    time.sleep(float(sys.argv[3]))  # an exit that hangs
follow_up = FollowUp(getattr(signal, sys.argv[2]))
"""


def run_snippet(*args: str) -> subprocess.CompletedProcess[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(
        [sys.executable, "-c", FOLLOW_UP_SIGNAL, *args],
        cwd=root, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_after_a_service_finished_its_stop_does_not_kill_it(
    sig: str, loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (``up`` test, flaky): the ingress logged "ingress stopped", then the
    SIGTERM ``up`` sends after a Ctrl-C arrived and killed it (exit -15, not 0)."""
    monkeypatch.setenv("EVENT_LOOP", loop)
    service = run_snippet("run_service", sig)
    assert service.returncode == 0, service.stderr
    assert "exited on our own" in service.stdout
    # the same with plain run(): the default action is back, and the signal kills it
    plain = run_snippet("run", sig)
    assert plain.returncode != 0
    assert "exited on our own" not in plain.stdout


def test_a_service_whose_exit_hangs_is_ended_by_the_watchdog_with_its_tracebacks() -> None:
    started = time.monotonic()
    service = run_snippet("run_service", "SIGTERM", "20")
    assert time.monotonic() - started < 15
    assert service.returncode != 0
    assert "Timeout (0:00:01)!" in service.stderr
    hang = FOLLOW_UP_SIGNAL.splitlines().index(
        "    time.sleep(float(sys.argv[3]))  # an exit that hangs"
    )
    assert f"line {hang + 1} in <module>" in service.stderr  # where it hung: the sleep
