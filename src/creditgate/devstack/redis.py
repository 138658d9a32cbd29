"""The system's `redis-server`, run in the background with an append-only file.

Layout under the stack's root folder:

    redis/           the data folder (appendonlydir/)
    redis/users.acl  secure mode: the ACL users, written at every start (hashed passwords)
    redis.log        the server's output
    redis.pid
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import redis

from creditgate.devstack.errors import DevStackError
from creditgate.devstack.process import Daemon, require_executable, write_private

APPENDFSYNC_MODES = ("always", "everysec", "no")

_REDIS_HINT = "install it with `apt-get install -y redis-server`"


def find_redis_server() -> str:
    return require_executable("redis-server", _REDIS_HINT)


@dataclass(frozen=True)
class RedisLogin:
    """How the stack itself talks to a secure Redis: TLS with its CA, as its admin user."""

    ca_file: Path
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class RedisSecurity:
    """What a secure node needs: its certificate and key, and its ACL users."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    # user name -> (password, ACL rules after "on >password")
    users: Mapping[str, tuple[str, str]] = field(repr=False)


def redis_answers(port: int, timeout: float = 1.0, login: RedisLogin | None = None) -> bool:
    """Whether the Redis on 127.0.0.1:`port` answers PING (not while it loads its AOF)."""
    try:
        with redis.Redis(
            host="127.0.0.1",
            port=port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            ssl=login is not None,
            ssl_ca_certs=str(login.ca_file) if login else None,
            username=login.username if login else None,
            password=login.password if login else None,
        ) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def acl_file_text(users: Mapping[str, tuple[str, str]]) -> str:
    """An aclfile: `default` off, then each user on, with its password as a SHA-256 hash.

    The file never holds a password in the clear, and a client that does not log in
    gets nothing: `default` is the user of every connection that sends no AUTH.
    """
    lines = ["user default off resetkeys resetchannels -@all"]
    for name, (password, rules) in users.items():
        digest = hashlib.sha256(password.encode()).hexdigest()
        lines.append(f"user {name} on #{digest} {rules}")
    return "\n".join(lines) + "\n"


# A cluster node that stops answering for this long is failed over to its replica: short,
# so that fault tests see a failover in seconds (Redis's default is 15 s).
CLUSTER_NODE_TIMEOUT_MS = 2000


class RedisNode:
    """One `redis-server` process with its data folder.

    `name` names its folder and files under the stack's root (`redis`, or `redis-7001`
    for a cluster node); `cluster` starts it as a Redis Cluster node.
    """

    def __init__(
        self,
        root: Path,
        *,
        appendfsync: str = "everysec",
        name: str = "redis",
        cluster: bool = False,
    ) -> None:
        if appendfsync not in APPENDFSYNC_MODES:
            raise DevStackError(
                f"appendfsync must be one of {', '.join(APPENDFSYNC_MODES)}, not {appendfsync!r}"
            )
        self.data_dir = root / name
        self.log_file = root / f"{name}.log"
        self._appendfsync = appendfsync
        self._cluster = cluster
        # Redis replaces its command line with a process title; the title
        # template below ends it with the data folder, which is what we look for.
        self._daemon = Daemon(
            "Redis",
            pid_file=root / f"{name}.pid",
            output_log=self.log_file,
            marker=str(self.data_dir),
        )

    @property
    def pid(self) -> int | None:
        return self._daemon.pid

    def start(self, port: int, security: RedisSecurity | None = None) -> None:
        """Start the server on 127.0.0.1:`port` (no wait); it reloads its AOF if there is one.

        With `security`, `port` speaks TLS only and every client logs in as an ACL user.
        """
        redis_server = find_redis_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        listen = ["--port", str(port)]
        if security is not None:
            acl_file = self.data_dir / "users.acl"
            write_private(acl_file, acl_file_text(security.users))
            # Paths are absolute: Redis changes into --dir before it reads them.
            listen = [
                "--port",
                "0",
                "--tls-port",
                str(port),
                "--tls-cert-file",
                str(security.cert_file.absolute()),
                "--tls-key-file",
                str(security.key_file.absolute()),
                "--tls-ca-cert-file",
                str(security.ca_file.absolute()),
                # Clients prove who they are with an ACL password, not a certificate.
                "--tls-auth-clients",
                "no",
                "--aclfile",
                str(acl_file.absolute()),
            ]
        self._daemon.start(
            [
                redis_server,
                *listen,
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
                # the worker refuses to start on a Redis that may evict (preflight);
                # noeviction is Redis's default, said here so nobody changes it unseen
                "--maxmemory-policy",
                "noeviction",
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
                "--proc-title-template",
                f"{{title}} {{listen-addr}} {self.data_dir}",
                *(self._cluster_arguments() if self._cluster else ()),
            ]
        )

    def _cluster_arguments(self) -> tuple[str, ...]:
        return (
            "--cluster-enabled",
            "yes",
            # Redis keeps the cluster's shape there (in --dir) and rewrites it itself
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(CLUSTER_NODE_TIMEOUT_MS),
        )

    def wait_ready(self, port: int, timeout: float, login: RedisLogin | None = None) -> None:
        self._daemon.wait_until(lambda: redis_answers(port, login=login), timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down cleanly (SIGTERM: Redis fsyncs its AOF); SIGKILL after `timeout` seconds."""
        self._daemon.stop(timeout)

    def kill(self) -> None:
        """SIGKILL: writes not yet fsynced to the AOF are lost, as in a real crash."""
        self._daemon.kill()

    def remove_data(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)
