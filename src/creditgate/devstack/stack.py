"""The local stack: one Kafka node and one Redis, started and stopped together.

Everything lives under one root folder (usually `<project>/.devstack`):

    ports.json   the ports chosen at the first `up`, reused while the data lives
    env          CREDITGATE_KAFKA_BOOTSTRAP and CREDITGATE_REDIS_URL
    kafka/ kafka.log kafka.out kafka.pid      see creditgate.devstack.kafka
    redis/ redis.log redis.pid                see creditgate.devstack.redis
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from creditgate.devstack.errors import DevStackError
from creditgate.devstack.kafka import (
    KafkaNode,
    default_jars_cache_dir,
    ensure_kafka_jars,
    find_java,
    kafka_answers,
)
from creditgate.devstack.process import find_free_port, wait_ports_free
from creditgate.devstack.redis import RedisNode, find_redis_server, redis_answers

BOOTSTRAP_ENV = "CREDITGATE_KAFKA_BOOTSTRAP"
REDIS_URL_ENV = "CREDITGATE_REDIS_URL"

# How long a stopped server's ports may take to be released by the kernel.
_PORT_RELEASE_SECONDS = 5.0


@dataclass(frozen=True)
class Endpoints:
    kafka_bootstrap: str  # "127.0.0.1:PORT"
    redis_url: str  # "redis://127.0.0.1:PORT/0"

    def as_env(self) -> dict[str, str]:
        """The settings' environment variables that point at these endpoints."""
        return {BOOTSTRAP_ENV: self.kafka_bootstrap, REDIS_URL_ENV: self.redis_url}


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
    kafka: int
    kafka_controller: int
    redis: int

    @property
    def endpoints(self) -> Endpoints:
        return Endpoints(
            kafka_bootstrap=f"127.0.0.1:{self.kafka}",
            redis_url=f"redis://127.0.0.1:{self.redis}/0",
        )


class DevStack:
    """A single-node Apache Kafka (KRaft) and a Redis server, without Docker.

    The servers run detached from the calling process, so they outlive the
    CLI that started them; any later `DevStack` on the same root finds them
    again by their pid files. All methods block until done.
    """

    def __init__(
        self,
        root: Path,
        *,
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
        self._kafka = KafkaNode(self.root, heap=kafka_heap)
        self._redis = RedisNode(self.root, appendfsync=redis_appendfsync)
        self._ports_file = self.root / "ports.json"

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
        ports = self._ports_for_up()
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
                self._kafka.start(libs, port=ports.kafka, controller_port=ports.kafka_controller)
                started.append(self._kafka)
            if start_redis:
                self._redis.start(ports.redis)
                started.append(self._redis)
            self._redis.wait_ready(ports.redis, self.redis_timeout)
            self._kafka.wait_ready(ports.kafka, self.kafka_timeout)
        except BaseException:
            for node in started:
                node.kill()
            raise
        endpoints = ports.endpoints
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
        self._ports_file.unlink(missing_ok=True)
        self.env_file.unlink(missing_ok=True)

    def status(self) -> StackStatus:
        ports = self._load_ports()
        kafka_pid = self._kafka.pid
        redis_pid = self._redis.pid
        endpoints = ports.endpoints if ports else None
        return StackStatus(
            kafka_running=bool(ports and kafka_pid and kafka_answers(ports.kafka)),
            kafka_pid=kafka_pid,
            kafka_bootstrap=endpoints.kafka_bootstrap if endpoints else None,
            redis_running=bool(ports and redis_pid and redis_answers(ports.redis)),
            redis_pid=redis_pid,
            redis_url=endpoints.redis_url if endpoints else None,
        )

    def endpoints(self) -> Endpoints:
        """The endpoints of this stack (running or not); an error before the first `up`."""
        return self._require_ports().endpoints

    # Single servers, for fault-injection tests: same ports and data as before.

    def start_kafka(self, *, wait: bool = True) -> None:
        """Start Kafka again on its port with its data; no-op if it is running."""
        ports = self._require_ports()
        if self._kafka.pid is None:
            self._require_free("Kafka", ports.kafka, ports.kafka_controller)
            libs = ensure_kafka_jars(self.jars_cache_dir)
            self._kafka.start(libs, port=ports.kafka, controller_port=ports.kafka_controller)
        if wait:
            self._kafka.wait_ready(ports.kafka, self.kafka_timeout)

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
            self._redis.start(ports.redis)
        if wait:
            self._redis.wait_ready(ports.redis, self.redis_timeout)

    def stop_redis(self, timeout: float = 10.0) -> None:
        """Clean shutdown (SIGTERM, AOF fsynced), SIGKILL after `timeout` seconds."""
        self._redis.stop(timeout)

    def kill_redis(self) -> None:
        """SIGKILL: a Redis crash; writes not yet fsynced are lost."""
        self._redis.kill()

    def _ports_for_up(self) -> _Ports:
        saved = self._load_ports()
        if saved is None:
            # A fresh stack. Servers without saved ports are orphans of a
            # broken root, and the logs of a previous stack would only confuse.
            self._kafka.stop()
            self._redis.stop()
            for log in ("kafka.log", "kafka.out", "redis.log"):
                (self.root / log).unlink(missing_ok=True)
        # A running server keeps its ports; a stopped one keeps them too unless
        # another process took them meanwhile.
        kafka_ports = (saved.kafka, saved.kafka_controller) if saved else ()
        if self._kafka.pid is None and not _all_free(kafka_ports):
            kafka_ports = (find_free_port(), find_free_port())
        redis_ports = (saved.redis,) if saved else ()
        if self._redis.pid is None and not _all_free(redis_ports):
            redis_ports = (find_free_port(),)
        ports = _Ports(*kafka_ports, *redis_ports)
        if len({ports.kafka, ports.kafka_controller, ports.redis}) < 3:
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
        _write_atomically(self.env_file, "\n".join(lines) + "\n")


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
