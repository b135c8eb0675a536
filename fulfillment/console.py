"""How ``fulfillment up`` speaks: each line prefixed with who said it, as its children's are;
on a terminal, a block of lines (the demo's table) can stay at the bottom, redrawn in place,
while every other line goes above it."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable


def prefix(name: str) -> str:
    return f"{name:<8} | "


def show(name: str, line: str) -> None:
    write(prefix(name) + line + "\n")


def say(line: str) -> None:
    """A line of ``up``'s own."""
    show("up", line)


def link_host(host: str) -> str:
    """The host to put in a link to a server listening on ``host``: one listening on every
    address is reached here as localhost (0.0.0.0 is no address to browse to)."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        return "localhost"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def colour() -> bool:
    """Whether what ``up`` prints may be coloured: a terminal, unless NO_COLOR is set."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


class _Live:
    """The lines kept at the bottom of the terminal, as last drawn."""

    lines: list[str] = []  # noqa: RUF012 - one terminal, one block


def write(text: str) -> None:
    """``text`` (whole lines) on stdout, above the block kept in place if there is one."""
    if _Live.lines:
        # back to the block's first line and clear from there; then the text, then the block
        text = f"\x1b[{len(_Live.lines)}F\x1b[J" + text + "".join(f"{x}\n" for x in _Live.lines)
    sys.stdout.write(text)
    sys.stdout.flush()


def keep_in_place(lines: list[str]) -> None:
    """Draw ``lines`` at the bottom of the terminal in place of the block drawn before (each
    cut to the terminal's width, so that none wraps and the next redraw finds them all)."""
    width = shutil.get_terminal_size().columns - 1
    drawn = [_cut(line, width) for line in lines]
    erase = f"\x1b[{len(_Live.lines)}F\x1b[J" if _Live.lines else ""
    sys.stdout.write(erase + "".join(f"{x}\n" for x in drawn))
    sys.stdout.flush()
    _Live.lines = drawn


def let_go() -> None:
    """Leave the block where it is, as ordinary lines: what comes next goes below it."""
    _Live.lines = []


def _cut(line: str, width: int) -> str:
    """At most ``width`` visible characters (colour codes do not count)."""
    visible, out, i = 0, [], 0
    while i < len(line):
        if line[i] == "\x1b":
            end = line.find("m", i)
            if end != -1:
                out.append(line[i : end + 1])
                i = end + 1
                continue
        if visible == width:
            if "\x1b" in line:
                out.append("\x1b[0m")  # a colour cut off must not run on
            break
        out.append(line[i])
        visible += 1
        i += 1
    return "".join(out)


def table(name: str) -> Callable[[list[str], bool], None]:
    """Show a table that changes (its lines, and whether they are the last): redrawn in place
    on a terminal; elsewhere (a pipe, a log) only its last state, once."""

    def show_table(lines: list[str], final: bool) -> None:
        if sys.stdout.isatty():
            keep_in_place([prefix(name) + line for line in lines])
            if final:
                let_go()
        elif final:
            write("".join(f"{prefix(name)}{line}\n" for line in lines))

    return show_table
