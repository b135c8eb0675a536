"""A command run on a pseudo-terminal of its own, as typed in a shell: it sees a terminal
(colours, in-place updates), and Ctrl-C is a byte written to that terminal, which the
kernel turns into SIGINT for the foreground process group."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
import termios
import threading
import time


class Terminal:
    def __init__(self, args: list[str], env: dict[str, str], *, cwd: str | None = None) -> None:
        master, slave = os.openpty()
        # a wide screen: the tables of `status` and `demo` are wider than 80 columns
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))

        def take_the_terminal() -> None:  # in the child: its own session, this its terminal
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.process = subprocess.Popen(
            [sys.executable, "-m", "fulfillment", *args],
            stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
            preexec_fn=take_the_terminal,
        )  # fmt: skip
        os.close(slave)
        self.master = master
        self._output = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # the terminal closed: every process holding it has gone
                return
            if not chunk:
                return
            self._output += chunk

    @property
    def output(self) -> str:
        return self._output.decode(errors="replace")

    def wait_for(self, text: str, timeout_s: float = 60, *, times: int = 1) -> None:
        """Until ``text`` has been shown ``times`` times."""
        deadline = time.monotonic() + timeout_s
        while self.output.count(text) < times:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never shown; output:\n{self.output[-4000:]}")
            time.sleep(0.05)

    def ctrl_c(self) -> None:
        os.write(self.master, b"\x03")

    def wait(self, timeout_s: float = 30) -> int:
        code = self.process.wait(timeout_s)
        self._reader.join(5)
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)
        os.close(self.master)
