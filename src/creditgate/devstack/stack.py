"""The local stack: one Kafka node and one Redis, started and stopped together.

Everything lives under one root folder (usually `<project>/.devstack`):

    ports.json   the ports chosen at the first `up`, reused while the data lives
    env          CREDITGATE_KAFKA_BOOTSTRAP and CREDITGATE_REDIS_URL, and in secure
                 mode the protocol, users, passwords and CA file (then 0600)
    kafka/ kafka.log kafka.out kafka.pid      see creditgate.devstack.kafka
    redis/ redis.log redis.pid                see creditgate.devstack.redis
    secure/                                   see creditgate.devstack.secure

`DevStack(root, secure=True)` starts the stack in secure mode: Kafka with SASL_SSL and
SASL_PLAINTEXT listeners (SCRAM-SHA-512, ACLs enforced), Redis over TLS only with ACL
users and the `default` user off, all signed by a throwaway CA.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from creditgate.devstack.errors import DevStackError
from creditgate.devstack.kafka import (
    SCRAM_MECHANISM,
    KafkaNode,
    default_jars_cache_dir,
    ensure_kafka_jars,
    find_java,
    kafka_answers,
)
from creditgate.devstack.process import find_free_port, wait_ports_free, write_private
from creditgate.devstack.redis import RedisLogin, RedisNode, find_redis_server, redis_answers
from creditgate.devstack.secure import APP_USER, Credentials, SecureFiles, grant_app_acls

BOOTSTRAP_ENV = "CREDITGATE_KAFKA_BOOTSTRAP"
REDIS_URL_ENV = "CREDITGATE_REDIS_URL"

# How long a stopped server's ports may take to be released by the kernel.
_PORT_RELEASE_SECONDS = 5.0


KAFKA_PROTOCOLS = ("SASL_SSL", "SASL_PLAINTEXT")


@dataclass(frozen=True)
class StackSecurity:
    """How creditgate logs in to a secure stack: as `creditgate`, trusting the stack's CA."""

    ca_file: Path
    kafka_sasl_plaintext_bootstrap: str  # "127.0.0.1:PORT": the same broker without TLS
    kafka_username: str
    kafka_password: str = field(repr=False)
    redis_username: str
    redis_password: str = field(repr=False)
    kafka_sasl_mechanism: str = SCRAM_MECHANISM


@dataclass(frozen=True)
class Endpoints:
    kafka_bootstrap: str  # "127.0.0.1:PORT"; the SASL_SSL listener in secure mode
    redis_url: str  # "redis://127.0.0.1:PORT/0"; "rediss://creditgate@127.0.0.1:PORT/0"
    security: StackSecurity | None = None

    def as_env(self, kafka_protocol: str = "SASL_SSL") -> dict[str, str]:
        """The settings' environment variables that point at these endpoints.

        In secure mode `kafka_protocol` picks the Kafka listener: SASL_SSL or
        SASL_PLAINTEXT. The values include passwords: pass them to a process, do not
        print them.
        """
        if self.security is None:
            return {BOOTSTRAP_ENV: self.kafka_bootstrap, REDIS_URL_ENV: self.redis_url}
        if kafka_protocol not in KAFKA_PROTOCOLS:
            raise DevStackError(
                f"the secure stack's Kafka speaks {' or '.join(KAFKA_PROTOCOLS)}, "
                f"not {kafka_protocol}"
            )
        security = self.security
        tls = kafka_protocol == "SASL_SSL"
        env = {
            BOOTSTRAP_ENV: (
                self.kafka_bootstrap if tls else security.kafka_sasl_plaintext_bootstrap
            ),
            "CREDITGATE_KAFKA_SECURITY_PROTOCOL": kafka_protocol,
            "CREDITGATE_KAFKA_SASL_MECHANISM": security.kafka_sasl_mechanism,
            "CREDITGATE_KAFKA_USERNAME": security.kafka_username,
            "CREDITGATE_KAFKA_PASSWORD": security.kafka_password,
        }
        if tls:
            env["CREDITGATE_KAFKA_CA_FILE"] = str(security.ca_file)
        env[REDIS_URL_ENV] = self.redis_url
        env["CREDITGATE_REDIS_PASSWORD"] = security.redis_password
        env["CREDITGATE_REDIS_CA_FILE"] = str(security.ca_file)
        return env


@dataclass(frozen=True)
class StackStatus:
    """Running means the process is alive and answers on its port."""

    kafka_running: bool
    kafka_pid: int | None
    kafka_bootstrap: str | None
    redis_running: bool
    redis_pid: int | None
    redis_url: str | None

    @property
    def running(self) -> bool:
        return self.kafka_running and self.redis_running

    def __str__(self) -> str:
        rows = (
            ("kafka", self.kafka_running, self.kafka_pid, self.kafka_bootstrap),
            ("redis", self.redis_running, self.redis_pid, self.redis_url),
        )
        return "\n".join(
            f"{name:<6}{_state(running, pid):<11}{f'pid {pid}' if pid else '-':<11}{address or '-'}"
            for name, running, pid, address in rows
        )


@dataclass(frozen=True)
class _Ports:
    kafka: int  # PLAINTEXT, or SASL_SSL in secure mode
    kafka_controller: int
    redis: int  # TLS only in secure mode
    kafka_sasl_plaintext: int = 0  # secure mode only

    @property
    def endpoints(self) -> Endpoints:
        return Endpoints(
            kafka_bootstrap=f"127.0.0.1:{self.kafka}",
            redis_url=f"redis://127.0.0.1:{self.redis}/0",
        )

    @property
    def kafka_check(self) -> int:
        # The readiness probe speaks plain TCP: ApiVersions is answered before any
        # SASL login, but not before a TLS handshake.
        return self.kafka_sasl_plaintext or self.kafka

    def secure_endpoints(self, credentials: Credentials, ca_file: Path) -> Endpoints:
        return Endpoints(
            kafka_bootstrap=f"127.0.0.1:{self.kafka}",
            redis_url=f"rediss://{APP_USER}@127.0.0.1:{self.redis}/0",
            security=StackSecurity(
                ca_file=ca_file,
                kafka_sasl_plaintext_bootstrap=f"127.0.0.1:{self.kafka_sasl_plaintext}",
                kafka_username=APP_USER,
                kafka_password=credentials.kafka_app,
                redis_username=APP_USER,
                redis_password=credentials.redis_app,
            ),
        )


class DevStack:
    """A single-node Apache Kafka (KRaft) and a Redis server, without Docker.

    The servers run detached from the calling process, so they outlive the
    CLI that started them; any later `DevStack` on the same root finds them
    again by their pid files. All methods block until done.

    `secure` picks the mode of a fresh stack; a stack that exists keeps the mode
    it was started in. `redis_key_prefixes` are the key prefixes (CREDITGATE_KEY_PREFIX)
    the secure Redis lets creditgate's user touch.
    """

    def __init__(
        self,
        root: Path,
        *,
        secure: bool = False,
        redis_key_prefixes: Sequence[str] = ("cg",),
        redis_appendfsync: str = "everysec",
        jars_cache_dir: Path | None = None,
        kafka_heap: str = "512m",
        kafka_timeout: float = 60.0,
        redis_timeout: float = 10.0,
    ) -> None:
        self.root = root.absolute()
        self.jars_cache_dir = jars_cache_dir or default_jars_cache_dir()
        self.kafka_timeout = kafka_timeout
        self.redis_timeout = redis_timeout
        self.redis_key_prefixes = tuple(redis_key_prefixes)
        self._secure = secure
        self._kafka = KafkaNode(self.root, heap=kafka_heap)
        self._redis = RedisNode(self.root, appendfsync=redis_appendfsync)
        self._secure_files = SecureFiles(self.root)
        self._ports_file = self.root / "ports.json"

    @property
    def secure(self) -> bool:
        """The mode of the stack on disk, or the one asked for when there is none yet."""
        if self._load_ports() is None:
            return self._secure
        return self._secure_files.exists

    @property
    def env_file(self) -> Path:
        return self.root / "env"

    def up(self) -> Endpoints:
        """Start whatever is not running yet, wait until both answer, write the env file.

        Servers already running are kept (and waited for if still starting),
        so calling `up` again is harmless. If this call fails, the servers it
        started are stopped again.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        if self._load_ports() is not None and self._secure_files.exists != self._secure:
            have, want = ("secure", "plain") if self._secure_files.exists else ("plain", "secure")
            raise DevStackError(
                f"the dev stack in {self.root} runs in {have} mode, not {want}: "
                "stop it with `creditgate dev down` first"
            )
        ports = self._ports_for_up()
        if self._secure:
            self._secure_files.credentials()  # from here on the stack on disk is secure
        start_kafka, start_redis = self._kafka.pid is None, self._redis.pid is None
        # Look for every tool before starting anything: a missing one then costs nothing.
        if start_redis:
            find_redis_server()
        libs: Path | None = None
        if start_kafka:
            find_java()
            libs = ensure_kafka_jars(self.jars_cache_dir)
        started: list[KafkaNode | RedisNode] = []
        try:
            # Kafka's JVM takes seconds to start: launch it first and bring
            # Redis up while it boots.
            if libs is not None:
                self._start_kafka_node(libs, ports)
                started.append(self._kafka)
            if start_redis:
                self._start_redis_node(ports)
                started.append(self._redis)
            self._redis.wait_ready(ports.redis, self.redis_timeout, self._redis_login())
            self._kafka.wait_ready(ports.kafka_check, self.kafka_timeout)
            if self._secure:
                self._grant_kafka_acls(ports)
        except BaseException:
            for node in started:
                node.kill()
            raise
        endpoints = self._endpoints(ports)
        self._write_env(endpoints)
        return endpoints

    def down(self) -> None:
        """Stop both servers and delete their data, ports, pid files and env file.

        The logs stay for a post-mortem until the next fresh `up`.
        """
        self._kafka.stop()
        self._redis.stop()
        self._kafka.remove_data()
        self._redis.remove_data()
        self._secure_files.remove()
        self._ports_file.unlink(missing_ok=True)
        self.env_file.unlink(missing_ok=True)

    def status(self) -> StackStatus:
        ports = self._load_ports()
        kafka_pid = self._kafka.pid
        redis_pid = self._redis.pid
        endpoints = self._endpoints(ports) if ports else None
        login = self._redis_login()
        return StackStatus(
            kafka_running=bool(ports and kafka_pid and kafka_answers(ports.kafka_check)),
            kafka_pid=kafka_pid,
            kafka_bootstrap=endpoints.kafka_bootstrap if endpoints else None,
            redis_running=bool(ports and redis_pid and redis_answers(ports.redis, login=login)),
            redis_pid=redis_pid,
            redis_url=endpoints.redis_url if endpoints else None,
        )

    def endpoints(self) -> Endpoints:
        """The endpoints of this stack (running or not); an error before the first `up`."""
        return self._endpoints(self._require_ports())

    def credentials(self) -> Credentials:
        """Every password of a secure stack, the admins' included (for tests)."""
        if not self.secure:
            raise DevStackError(f"the dev stack in {self.root} is not in secure mode")
        return self._secure_files.credentials()

    # Single servers, for fault-injection tests: same ports and data as before.

    def start_kafka(self, *, wait: bool = True) -> None:
        """Start Kafka again on its port with its data; no-op if it is running."""
        ports = self._require_ports()
        if self._kafka.pid is None:
            kafka_ports = (ports.kafka, ports.kafka_controller, ports.kafka_sasl_plaintext)
            self._require_free("Kafka", *(port for port in kafka_ports if port))
            self._start_kafka_node(ensure_kafka_jars(self.jars_cache_dir), ports)
        if wait:
            self._kafka.wait_ready(ports.kafka_check, self.kafka_timeout)

    def stop_kafka(self, timeout: float = 30.0) -> None:
        """Controlled shutdown (SIGTERM), SIGKILL after `timeout` seconds."""
        self._kafka.stop(timeout)

    def kill_kafka(self) -> None:
        """SIGKILL: a broker crash."""
        self._kafka.kill()

    def start_redis(self, *, wait: bool = True) -> None:
        """Start Redis again on its port; it reloads its AOF. No-op if it is running."""
        ports = self._require_ports()
        if self._redis.pid is None:
            self._require_free("Redis", ports.redis)
            self._start_redis_node(ports)
        if wait:
            self._redis.wait_ready(ports.redis, self.redis_timeout, self._redis_login())

    def stop_redis(self, timeout: float = 10.0) -> None:
        """Clean shutdown (SIGTERM, AOF fsynced), SIGKILL after `timeout` seconds."""
        self._redis.stop(timeout)

    def kill_redis(self) -> None:
        """SIGKILL: a Redis crash; writes not yet fsynced are lost."""
        self._redis.kill()

    def copy_redis_data(self, destination: Path, attempts: int = 20) -> None:
        """Copy Redis's data folder (its AOF) as it is on disk now, Redis running: what a
        backup, a lagging replica or a disk that lost its last second would hold later.

        An AOF rewrite may be under way: its temporary files are left out (Redis ignores
        them on load too), and a copy whose manifest names a file the copy lacks (the
        rewrite swapped files while it was taken) is taken again.
        """
        for _ in range(attempts):
            shutil.rmtree(destination, ignore_errors=True)
            try:
                shutil.copytree(
                    self._redis.data_dir, destination, ignore=shutil.ignore_patterns("temp-*")
                )
            except shutil.Error:
                continue  # a file went away while it was copied
            if _aof_complete(destination):
                return
            time.sleep(0.1)
        raise DevStackError(f"could not copy {self._redis.data_dir} while Redis rewrote it")

    def restore_redis_data(self, source: Path | None) -> None:
        """SIGKILL Redis and start it again from ``source`` (a ``copy_redis_data`` copy),
        or empty (None: a Redis without persistence, or a flushed one). Every write after
        the copy is gone, as after a host crash or a failover to a lagging replica."""
        self.kill_redis()
        self._redis.remove_data()
        if source is not None:
            shutil.copytree(source, self._redis.data_dir)
        self.start_redis()

    def _start_kafka_node(self, libs: Path, ports: _Ports) -> None:
        security = None
        if self.secure:
            security = self._secure_files.kafka_security(ports.kafka_sasl_plaintext)
        self._kafka.start(
            libs, port=ports.kafka, controller_port=ports.kafka_controller, security=security
        )

    def _start_redis_node(self, ports: _Ports) -> None:
        security = None
        if self.secure:
            security = self._secure_files.redis_security(self.redis_key_prefixes)
        self._redis.start(ports.redis, security)

    def _redis_login(self) -> RedisLogin | None:
        return self._secure_files.redis_login() if self.secure else None

    def _endpoints(self, ports: _Ports) -> Endpoints:
        if not self.secure:
            return ports.endpoints
        return ports.secure_endpoints(
            self._secure_files.credentials(), self._secure_files.tls().ca_file
        )

    def _grant_kafka_acls(self, ports: _Ports) -> None:
        try:
            grant_app_acls(ports.kafka_sasl_plaintext, self._secure_files.credentials().kafka_admin)
        except DevStackError:
            raise
        except Exception as exc:
            raise DevStackError(f"could not create the Kafka ACLs of {APP_USER}: {exc}") from exc

    def _ports_for_up(self) -> _Ports:
        saved = self._load_ports()
        if saved is None:
            # A fresh stack. Servers without saved ports are orphans of a
            # broken root, and the logs and secrets of a previous stack would
            # only confuse.
            self._kafka.stop()
            self._redis.stop()
            self._secure_files.remove()
            for log in ("kafka.log", "kafka.out", "redis.log"):
                (self.root / log).unlink(missing_ok=True)
        # A running server keeps its ports; a stopped one keeps them too unless
        # another process took them meanwhile. A plain stack has no SASL_PLAINTEXT port (0).
        kafka, controller, sasl_plaintext = (
            (saved.kafka, saved.kafka_controller, saved.kafka_sasl_plaintext)
            if saved
            else (0, 0, 0)
        )
        if self._kafka.pid is None and not _all_free(
            tuple(port for port in (kafka, controller, sasl_plaintext) if port)
        ):
            kafka, controller = find_free_port(), find_free_port()
            sasl_plaintext = find_free_port() if self._secure else 0
        redis = saved.redis if saved else 0
        if self._redis.pid is None and not _all_free((redis,) if redis else ()):
            redis = find_free_port()
        ports = _Ports(kafka, controller, redis, kafka_sasl_plaintext=sasl_plaintext)
        chosen = [port for port in (kafka, controller, redis, sasl_plaintext) if port]
        if len(set(chosen)) < len(chosen):
            # The OS can hand out one port twice while none of them is bound yet.
            return self._ports_for_up()
        self._save_ports(ports)
        return ports

    def _require_ports(self) -> _Ports:
        ports = self._load_ports()
        if ports is None:
            raise DevStackError(f"no dev stack in {self.root}: start it with `creditgate dev up`")
        return ports

    @staticmethod
    def _require_free(name: str, *ports: int) -> None:
        if not wait_ports_free(ports, _PORT_RELEASE_SECONDS):
            listed = ", ".join(str(port) for port in ports)
            raise DevStackError(
                f"cannot start {name} again: port {listed} is in use by another process"
            )

    def _load_ports(self) -> _Ports | None:
        try:
            return _Ports(**json.loads(self._ports_file.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def _save_ports(self, ports: _Ports) -> None:
        _write_atomically(self._ports_file, json.dumps(asdict(ports)) + "\n")

    def _write_env(self, endpoints: Endpoints) -> None:
        lines = [f"# written by `creditgate dev up`; load with: set -a; . {self.env_file}; set +a"]
        lines += [f"{name}={value}" for name, value in endpoints.as_env().items()]
        text = "\n".join(lines) + "\n"
        if endpoints.security is None:
            _write_atomically(self.env_file, text)
        else:
            write_private(self.env_file, text)  # it holds the passwords


def _state(running: bool, pid: int | None) -> str:
    if running:
        return "running"
    return "no answer" if pid else "stopped"


def _all_free(ports: tuple[int, ...]) -> bool:
    return bool(ports) and wait_ports_free(ports, _PORT_RELEASE_SECONDS)


def _write_atomically(path: Path, text: str) -> None:
    # A reader (a shell sourcing the env file) never sees half a file.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _aof_complete(data_dir: Path) -> bool:
    """Whether every file the AOF manifest names is in ``data_dir``'s AOF folder."""
    for manifest in data_dir.glob("*/*.manifest"):
        for line in manifest.read_text().splitlines():
            fields = line.split()
            if (
                len(fields) >= 2
                and fields[0] == "file"
                and not (manifest.parent / fields[1]).exists()
            ):
                return False
    return True
