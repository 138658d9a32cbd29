"""The system's `redis-server`, run in the background with an append-only file.

Layout under the stack's root folder:

    redis/       the data folder (appendonlydir/)
    redis.log    the server's output
    redis.pid
"""

from __future__ import annotations

import shutil
from pathlib import Path

import redis

from creditgate.devstack.errors import DevStackError
from creditgate.devstack.process import Daemon, require_executable

APPENDFSYNC_MODES = ("always", "everysec", "no")

_REDIS_HINT = "install it with `apt-get install -y redis-server`"


def find_redis_server() -> str:
    return require_executable("redis-server", _REDIS_HINT)


def redis_answers(port: int, timeout: float = 1.0) -> bool:
    """Whether the Redis on 127.0.0.1:`port` answers PING (not while it loads its AOF)."""
    try:
        with redis.Redis(
            host="127.0.0.1", port=port, socket_timeout=timeout, socket_connect_timeout=timeout
        ) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


class RedisNode:
    """One `redis-server` process with its data folder."""

    def __init__(self, root: Path, *, appendfsync: str = "everysec") -> None:
        if appendfsync not in APPENDFSYNC_MODES:
            raise DevStackError(
                f"appendfsync must be one of {', '.join(APPENDFSYNC_MODES)}, not {appendfsync!r}"
            )
        self.data_dir = root / "redis"
        self.log_file = root / "redis.log"
        self._appendfsync = appendfsync
        # Redis replaces its command line with a process title; the title
        # template below ends it with the data folder, which is what we look for.
        self._daemon = Daemon(
            "Redis",
            pid_file=root / "redis.pid",
            output_log=self.log_file,
            marker=str(self.data_dir),
        )

    @property
    def pid(self) -> int | None:
        return self._daemon.pid

    def start(self, port: int) -> None:
        """Start the server on 127.0.0.1:`port` (no wait); it reloads its AOF if there is one."""
        redis_server = find_redis_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._daemon.start(
            [
                redis_server,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.data_dir),
                # Durability comes from the AOF alone; RDB snapshots would only
                # add fork pauses.
                "--appendonly",
                "yes",
                "--appendfsync",
                self._appendfsync,
                "--save",
                "",
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
                "--proc-title-template",
                f"{{title}} {{listen-addr}} {self.data_dir}",
            ]
        )

    def wait_ready(self, port: int, timeout: float) -> None:
        self._daemon.wait_until(lambda: redis_answers(port), timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down cleanly (SIGTERM: Redis fsyncs its AOF); SIGKILL after `timeout` seconds."""
        self._daemon.stop(timeout)

    def kill(self) -> None:
        """SIGKILL: writes not yet fsynced to the AOF are lost, as in a real crash."""
        self._daemon.kill()

    def remove_data(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)
