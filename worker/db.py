"""PostgreSQL: the pool, and versioned migrations that are safe to run concurrently."""

from __future__ import annotations

import re
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from shared.errors import ConfigError, TransientError
from shared.logging import get_logger
from shared.settings import redact_url

log = get_logger(__name__)

# What a database outage, restart or overload looks like to asyncpg: trying again later may
# work. Used by the retry policy and by the store's insistence on recording an effect.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,  # also asyncpg's command_timeout
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.AdminShutdownError,
    asyncpg.QueryCanceledError,
    asyncpg.LockNotAvailableError,
    # what asyncpg raises on a connection the server dropped mid-protocol (a PostgreSQL
    # restart): "cannot switch to state …; another operation in progress"
    asyncpg.InternalClientError,
)

# What else a database that cannot serve us now answers, by SQLSTATE (asyncpg has a class for
# many, not all): classes 08 (connection exception), 53 (insufficient resources: disk,
# memory, connections), 57P0x (operator intervention: shut down, crashed, starting up,
# database dropped); 55000 (object not in prerequisite state: what a database that does not
# allow connections, ALTER DATABASE … ALLOW_CONNECTIONS false, answers a new one); and a
# statement's own bad luck: 40001 serialization, 40P01 deadlock, 57014 cancelled, 55P03 lock
# not available.
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "53", "57P0")
_TRANSIENT_SQLSTATES = frozenset({"55000", "55P03", "40001", "40P01", "57014"})


def is_transient(exc: BaseException) -> bool:
    """Whether failing to get or use a database connection may work later: retried (in
    process, then through the delay queues), never dead-lettered as permanent."""
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = str(exc.sqlstate or "")
        return state.startswith(_TRANSIENT_SQLSTATE_PREFIXES) or state in _TRANSIENT_SQLSTATES
    return False


# No statement waits longer than this (a lock held by a stuck worker, a half-open TCP
# connection): the handler fails with a transient error and is retried instead of hanging.
COMMAND_TIMEOUT_S = 30.0

# Any constant shared by every process that migrates; pg_advisory_lock takes a bigint.
MIGRATION_LOCK_ID = 0x66756C66  # "fulf"
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every file in worker/migrations, in order."""
    found = []
    for entry in resources.files("worker.migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text("utf-8")))
    return sorted(found)


async def _connect(url: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url, timeout=10)
    except asyncpg.InvalidCatalogNameError:
        raise
    except asyncpg.ClientConfigurationError as exc:  # a parameter asyncpg cannot use
        raise ConfigError(f"DATABASE_URL {redact_url(url)} is not usable: {exc}") from None
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise connect_error(url, exc) from None


# The server answered and refused who we say we are (28000, 28P01): a setting to fix.
_REFUSED_LOGIN = (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidPasswordError)


def connect_error(url: str, exc: BaseException) -> ConfigError | TransientError:
    """Why connecting failed, naming the server (password masked): ConfigError when it
    refused the role or password in DATABASE_URL (waiting will not help; with no user in
    the URL, PostgreSQL takes the login name), TransientError when it is away."""
    where = redact_url(url)
    if isinstance(exc, _REFUSED_LOGIN):
        return ConfigError(
            f"DATABASE_URL: PostgreSQL at {where} refused the login ({exc}); give a role "
            "that exists, and its password, in the URL (postgresql://user:password@host/db)"
        )
    return TransientError(
        f"cannot reach PostgreSQL at {where} ({type(exc).__name__}: {exc}); is it running? "
        "(pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start)"
    )


async def create_database_if_missing(url: str) -> bool:
    """Create the URL's database when it does not exist; True if it was created."""
    try:
        connection = await _connect(url)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await connection.close()
        return False
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = await _connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        await admin.execute(f'CREATE DATABASE "{name.replace(chr(34), chr(34) * 2)}"')
        log.info("database created", database=name)
        return True
    except asyncpg.DuplicateDatabaseError:
        return False  # another process created it at the same time
    finally:
        await admin.close()


async def migrate(url: str) -> list[str]:
    """Apply pending migrations under an advisory lock; returns the names applied."""
    await create_database_if_missing(url)
    connection = await _connect(url)
    applied: list[str] = []
    try:
        await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
        try:
            await connection.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version integer PRIMARY KEY,
                       name text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {
                r["version"]
                for r in await connection.fetch("SELECT version FROM schema_migrations")
            }
            for version, name, sql in migrations():
                if version in done:
                    continue
                async with connection.transaction():
                    await connection.execute(sql)
                    await connection.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        version,
                        name,
                    )
                applied.append(name)
                log.info("migration applied", migration=name)
        finally:
            await connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    finally:
        await connection.close()
    return applied


async def _no_reset(connection: asyncpg.Connection) -> None:
    """Release a pooled connection as it is (see create_pool)."""


async def create_pool(url: str, *, max_size: int) -> asyncpg.Pool:
    """A connection pool sized for the worker's concurrency."""
    try:
        pool = await asyncpg.create_pool(
            url,
            # one connection at once (a bad URL is said at start), and no floor kept: asyncpg
            # restores a floor in the background, logging a traceback for every attempt
            # while the database is away; each message's acquire reconnects instead
            init_size=1,
            min_size=0,
            max_size=max_size,
            timeout=10,
            command_timeout=COMMAND_TIMEOUT_S,
            # asyncpg's default reset costs a round trip per release, and the only session
            # state the worker leaves is a session's advisory lock, which Store.locked
            # releases or closes the connection over.
            reset=_no_reset,
            # the server notices a worker host that vanished and frees its session locks
            server_settings={
                "tcp_keepalives_idle": "30",
                "tcp_keepalives_interval": "10",
                "tcp_keepalives_count": "3",
            },
        )
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise connect_error(url, exc) from None
    assert pool is not None
    return pool
