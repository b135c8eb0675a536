"""Run ``fulfillment`` roles as real processes and read their JSON log lines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from typing import Any

from worker.settings import WorkerSettings


def run_fulfillment(
    *args: str,
    env: dict[str, str] | None = None,
    input_: str | None = None,
    timeout_s: float = 60,
) -> subprocess.CompletedProcess[str]:
    """``fulfillment ARGS`` to completion as a user would type it; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "fulfillment", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        input=input_,
    )


def cli(
    settings: WorkerSettings, *args: str, input_: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``fulfillment ARGS`` as a user would, with the test's broker, database and Stripe."""
    env = {**os.environ, **worker_env(settings), "LOG_FORMAT": "json"}
    return run_fulfillment(*args, env=env, input_=input_)


async def acli(settings: WorkerSettings, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, settings, *args)


class RoleProcess:
    """``python -m fulfillment <args>`` with its own environment; logs collected as dicts."""

    def __init__(self, args: list[str], env: dict[str, str], *, cwd: str | None = None) -> None:
        self.args = args
        self.env = {**os.environ, "LOG_FORMAT": "json", **env}
        self.cwd = cwd
        self.process: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self, ready_event: str | None = None, timeout_s: float = 20) -> RoleProcess:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fulfillment",
            *self.args,
            env=self.env,
            cwd=self.cwd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a command typed in a terminal
        )
        self._reader = asyncio.create_task(self._read())
        if ready_event:
            await self.wait_for_log(ready_event, timeout_s)
        return self

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))

    @property
    def logs(self) -> list[dict[str, Any]]:
        parsed = []
        for line in self.lines:
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict):
                    parsed.append(doc)
        return parsed

    def events(self, name: str) -> list[dict[str, Any]]:
        return [log for log in self.logs if log.get("event") == name]

    async def wait_for_log(self, event: str, timeout_s: float = 20) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            found = self.events(event)
            if found:
                return found[-1]
            if self.process is not None and self.process.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {event!r} log line; output:\n" + "\n".join(self.lines[-30:]))

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def signal_group(self, sig: signal.Signals) -> None:
        """As a terminal's Ctrl-C does: the signal to every process of the group at once."""
        assert self.process is not None
        os.killpg(self.process.pid, sig)

    async def wait(self, timeout_s: float = 30) -> int:
        assert self.process is not None
        code = await asyncio.wait_for(self.process.wait(), timeout_s)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)
        return code

    async def stop(self) -> None:
        if self.process is not None:
            # the whole group: `up`'s children too, even when `up` itself has exited
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            await self.process.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)


def broker_env(broker: Any) -> dict[str, str]:
    """Environment equal to in-process BrokerSettings (queue arguments must match)."""
    return {
        "RABBITMQ_URL": broker.url,
        "BROKER_PREFIX": broker.prefix,
        "RETRY_DELAYS_S": ",".join(str(d) for d in broker.retry_delays_s),
        "DELIVERY_LIMIT": str(broker.delivery_limit),
    }


def ingress_process(broker: Any, secret: str, port: int, **env: str) -> RoleProcess:
    """``fulfillment ingress`` on 127.0.0.1:``port`` with the tests' broker settings."""
    return RoleProcess(
        ["ingress"],
        {
            **broker_env(broker),
            "STRIPE_WEBHOOK_SECRETS": secret,
            "INGRESS_PORT": str(port),
            "INGRESS_HOST": "127.0.0.1",
            **env,
        },
    )


def worker_env(settings: Any) -> dict[str, str]:
    """Environment for a worker process equal to in-process WorkerSettings."""
    return {
        **broker_env(settings.broker),
        "DATABASE_URL": settings.database_url,
        "STRIPE_API_KEY": settings.stripe.api_key,
        "STRIPE_API_BASE": settings.stripe.api_base,
        "SMTP_URL": f"smtp://{settings.smtp.host}:{settings.smtp.port}",
        "SMTP_TIMEOUT_S": str(settings.smtp.timeout_s),
        "SMTP_CONNECT_TIMEOUT_S": str(settings.smtp.connect_timeout_s),
        "SMTP_DATA_TIMEOUT_S": str(settings.smtp.data_timeout_s),
        "SMTP_COOLDOWN_S": str(settings.smtp.cooldown_s),
        "MAIL_FROM": settings.smtp.sender,
        "WORKER_METRICS_PORT": "0",
        "WORKER_CONCURRENCY": str(settings.concurrency),
        "WORKER_GRACE_S": str(settings.grace_s),
        "WORKER_QUICK_RETRIES": str(settings.quick_retries),
        "STRIPE_NOT_FOUND_RETRIES": str(settings.stripe_not_found_retries),
    }


async def fresh_metrics(args: list[str], env: dict[str, str], ready_event: str, port: int) -> str:
    """What ``fulfillment ARGS`` serves on /metrics (on ``port``) once ``ready_event`` is
    logged, before it handled anything."""
    import aiohttp

    process = RoleProcess(args, env)
    try:
        await process.start(ready_event)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/metrics") as response,
        ):
            return await response.text()
    finally:
        await process.stop()
