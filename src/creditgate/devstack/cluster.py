"""The local cluster stack: three Kafka nodes and a Redis Cluster, without Docker.

What `creditgate dev up --cluster` runs on loopback: three Apache Kafka nodes in KRaft
combined mode (each a broker and one of three controllers), and a Redis Cluster of three
primaries with a replica each (`redis-server --cluster-enabled yes`, joined once with
`redis-cli --cluster create`). It is sized for a 2-core machine: about 1.6 GB of Kafka
heaps and six small Redis processes.

Layout under the stack's root folder (the same root as the single-node stack, which it
excludes):

    cluster.json                    the ports and Kafka's cluster id, kept while data lives
    env                             as for the single-node stack, plus CREDITGATE_REDIS_CLUSTER
    kafka-1/ kafka-1.log …          one folder and log per Kafka node (see devstack.kafka)
    redis-<port>/ redis-<port>.log  one per Redis node, nodes.conf inside (see devstack.redis)
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import redis

from creditgate.devstack.errors import DevStackError
from creditgate.devstack.kafka import (
    KafkaNode,
    KafkaQuorum,
    default_jars_cache_dir,
    ensure_kafka_jars,
    find_java,
    kafka_answers,
    new_cluster_id,
)
from creditgate.devstack.process import (
    ephemeral_port_start,
    find_free_port,
    port_is_free,
    require_executable,
    wait_ports_free,
)
from creditgate.devstack.redis import RedisNode, find_redis_server, redis_answers

KAFKA_NODES = 3
REDIS_PRIMARIES = 3
REDIS_NODES = REDIS_PRIMARIES * 2  # one replica each

_PORT_RELEASE_SECONDS = 5.0
_POLL_SECONDS = 0.1


@dataclass(frozen=True)
class NodeStatus:
    """One server of the stack: running means alive and answering."""

    name: str
    running: bool
    pid: int | None
    address: str
    role: str  # "broker+controller", "primary", "replica", or "-" when it does not answer

    def row(self) -> str:
        state = "running" if self.running else ("no answer" if self.pid else "stopped")
        pid = f"pid {self.pid}" if self.pid else "-"
        return f"{self.name:<12}{state:<11}{pid:<11}{self.role:<22}{self.address}"


@dataclass(frozen=True)
class ClusterStatus:
    nodes: tuple[NodeStatus, ...]
    cluster_state: str  # Redis's cluster_state as a node sees it: "ok", "fail" or "-"

    @property
    def running(self) -> bool:
        return (
            bool(self.nodes) and all(n.running for n in self.nodes) and self.cluster_state == "ok"
        )

    def __str__(self) -> str:
        rows = [f"{'node':<12}{'state':<11}{'pid':<11}{'role':<22}address"]
        rows += [node.row() for node in self.nodes]
        rows.append(f"redis cluster_state: {self.cluster_state}")
        return "\n".join(rows)


@dataclass(frozen=True)
class ClusterPorts:
    kafka: tuple[int, ...]
    kafka_controllers: tuple[int, ...]
    redis: tuple[int, ...]
    kafka_cluster_id: str

    @property
    def kafka_bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.kafka)

    @property
    def redis_url(self) -> str:
        # any node will do: the client learns the others from it (CLUSTER SLOTS)
        return f"redis://127.0.0.1:{self.redis[0]}/0"


class ClusterStack:
    """Three Kafka nodes and a six-node Redis Cluster, started and stopped together.

    Like `DevStack`, the servers outlive the process that started them and are found
    again by their pid files; every method blocks until done.
    """

    def __init__(
        self,
        root: Path,
        *,
        jars_cache_dir: Path | None = None,
        kafka_heap: str = "512m",
        kafka_timeout: float = 120.0,
        redis_timeout: float = 30.0,
    ) -> None:
        self.root = root.absolute()
        self.jars_cache_dir = jars_cache_dir or default_jars_cache_dir()
        self.kafka_timeout = kafka_timeout
        self.redis_timeout = redis_timeout
        self._kafka_heap = kafka_heap
        self._ports_file = self.root / "cluster.json"

    @staticmethod
    def exists_in(root: Path) -> bool:
        """Whether `root` holds a cluster stack (running or not)."""
        return (root / "cluster.json").is_file()

    @property
    def env_file(self) -> Path:
        return self.root / "env"

    # ---- the whole stack ---------------------------------------------------------

    def up(self) -> dict[str, str]:
        """Start what is not running, create the Redis Cluster on the first start, wait
        until every node answers and the cluster is whole, write the env file.

        Returns the settings' environment variables (`cluster_env`). Calling it again is
        harmless.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        if (self.root / "ports.json").is_file():
            raise DevStackError(
                f"a single-node dev stack runs in {self.root}: stop it with "
                "`creditgate dev down` first"
            )
        ports = self._ports_for_up()
        redis_cli = require_executable(
            "redis-cli", "install it with `apt-get install -y redis-tools`"
        )
        find_redis_server()
        libs = ensure_kafka_jars(self.jars_cache_dir)
        find_java()
        started: list[KafkaNode | RedisNode] = []
        try:
            for index in range(KAFKA_NODES):
                node = self._kafka_node(index, ports)
                if node.pid is None:
                    self._start_kafka(index, ports, libs)
                    started.append(node)
            for port in ports.redis:
                redis_node = self._redis_node(port)
                if redis_node.pid is None:
                    redis_node.start(port)
                    started.append(redis_node)
            for port in ports.redis:
                self._redis_node(port).wait_ready(port, self.redis_timeout)
            if not self._cluster_created(ports):
                self._create_cluster(redis_cli, ports)
            self.wait_cluster_ok(self.redis_timeout)
            for index, port in enumerate(ports.kafka):
                self._kafka_node(index, ports).wait_ready(port, self.kafka_timeout)
        except BaseException:
            for started_node in started:
                started_node.kill()
            raise
        self._write_env(ports)
        return cluster_env(ports)

    def down(self) -> None:
        """Stop every node and delete its data, the ports file and the env file."""
        ports = self._load_ports()
        if ports is None:
            return
        for index in range(KAFKA_NODES):
            node = self._kafka_node(index, ports)
            node.stop()
            node.remove_data()
        for port in ports.redis:
            redis_node = self._redis_node(port)
            redis_node.stop()
            redis_node.remove_data()
        self._ports_file.unlink(missing_ok=True)
        self.env_file.unlink(missing_ok=True)

    def status(self) -> ClusterStatus:
        ports = self._require_ports()
        nodes = [
            NodeStatus(
                f"kafka-{index + 1}",
                bool(node.pid and kafka_answers(port)),
                node.pid,
                f"127.0.0.1:{port}",
                "broker+controller",
            )
            for index, port in enumerate(ports.kafka)
            for node in (self._kafka_node(index, ports),)
        ]
        try:
            slots = Counter(self.slot_owners().values())
        except DevStackError:
            slots = Counter()
        for port in ports.redis:
            redis_node = self._redis_node(port)
            role = _redis_role(port) if redis_node.pid else None
            if role == "primary":
                role = f"primary, {slots[port]} slots"
            nodes.append(
                NodeStatus(
                    f"redis-{port}",
                    role is not None,
                    redis_node.pid,
                    f"127.0.0.1:{port}",
                    role or "-",
                )
            )
        return ClusterStatus(tuple(nodes), self._cluster_state(ports))

    def ports(self) -> ClusterPorts:
        return self._require_ports()

    # ---- single nodes, for fault tests ------------------------------------------

    def redis_primaries(self) -> list[int]:
        """The ports of the Redis nodes that are primaries now."""
        return [port for port in self._require_ports().redis if _redis_role(port) == "primary"]

    def kill_redis(self, port: int) -> None:
        """SIGKILL one Redis node: its replica takes over after the node timeout."""
        self._redis_node(port).kill()

    def start_redis(self, port: int) -> None:
        """Start a stopped Redis node again with its data; it rejoins as it can (a
        primary that was failed over comes back as a replica of its successor)."""
        node = self._redis_node(port)
        if node.pid is None:
            if not wait_ports_free((port,), _PORT_RELEASE_SECONDS):
                raise DevStackError(f"cannot start Redis again: port {port} is in use")
            node.start(port)
        node.wait_ready(port, self.redis_timeout)

    def kill_kafka(self, index: int) -> None:
        """SIGKILL Kafka node `index` (0-based): a broker and controller crash."""
        self._kafka_node(index, self._require_ports()).kill()

    def start_kafka(self, index: int) -> None:
        ports = self._require_ports()
        node = self._kafka_node(index, ports)
        if node.pid is None:
            self._start_kafka(index, ports, ensure_kafka_jars(self.jars_cache_dir))
        node.wait_ready(ports.kafka[index], self.kafka_timeout)

    def slot_owners(self) -> dict[int, int]:
        """Slot -> the port of the primary that owns it now (CLUSTER SLOTS of a node)."""
        for port in self._require_ports().redis:
            try:
                with _client(port) as client:
                    ranges = client.execute_command("CLUSTER SLOTS")
            except (redis.RedisError, OSError):
                continue
            return {
                slot: int(primary[1])
                for first, last, primary, *_ in ranges
                for slot in range(int(first), int(last) + 1)
            }
        raise DevStackError("no Redis node of the cluster answers")

    def reshard(self, source: int, target: int, slots: int) -> None:
        """Move ``slots`` slots (the lowest first) and their keys from the primary on
        port ``source`` to the one on ``target``, with ``redis-cli --cluster reshard``,
        while clients go on: keys of a slot being moved answer ASK, then MOVED."""
        redis_cli = require_executable(
            "redis-cli", "install it with `apt-get install -y redis-tools`"
        )
        result = subprocess.run(
            [
                redis_cli,
                "--cluster",
                "reshard",
                f"127.0.0.1:{source}",
                "--cluster-from",
                _node_id(source),
                "--cluster-to",
                _node_id(target),
                "--cluster-slots",
                str(slots),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if result.returncode != 0:
            raise DevStackError(
                f"redis-cli --cluster reshard failed:\n{(result.stdout + result.stderr)[-2000:]}"
            )

    def wait_failover(self, dead: int, timeout: float) -> None:
        """Until no slot is owned by the node on port ``dead`` and the cluster is whole:
        its replica was promoted."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                moved = dead not in self.slot_owners().values()
            except DevStackError:
                moved = False
            if moved:
                self.wait_cluster_ok(max(1.0, deadline - time.monotonic()))
                return
            if time.monotonic() >= deadline:
                raise DevStackError(f"the node on port {dead} was not failed over in {timeout:g}s")
            time.sleep(_POLL_SECONDS)

    def wait_cluster_ok(self, timeout: float) -> None:
        """Until every running Redis node reports `cluster_state:ok` with all slots."""
        ports = self._require_ports()
        deadline = time.monotonic() + timeout
        while True:
            running = [p for p in ports.redis if self._redis_node(p).pid is not None]
            if running and all(_cluster_info(p).get("cluster_state") == "ok" for p in running):
                return
            if time.monotonic() >= deadline:
                states = {p: _cluster_info(p).get("cluster_state", "-") for p in running}
                raise DevStackError(f"the Redis Cluster is not whole after {timeout:g}s: {states}")
            time.sleep(_POLL_SECONDS)

    # ---- inside --------------------------------------------------------------------

    def _kafka_node(self, index: int, ports: ClusterPorts) -> KafkaNode:
        quorum = KafkaQuorum(
            node_id=index + 1,
            voters={i + 1: port for i, port in enumerate(ports.kafka_controllers)},
            cluster_id=ports.kafka_cluster_id,
        )
        return KafkaNode(self.root, heap=self._kafka_heap, name=f"kafka-{index + 1}", quorum=quorum)

    def _start_kafka(self, index: int, ports: ClusterPorts, libs: Path) -> None:
        self._kafka_node(index, ports).start(
            libs, port=ports.kafka[index], controller_port=ports.kafka_controllers[index]
        )

    def _redis_node(self, port: int) -> RedisNode:
        return RedisNode(self.root, name=f"redis-{port}", cluster=True)

    def _cluster_created(self, ports: ClusterPorts) -> bool:
        return all(
            int(_cluster_info(port).get("cluster_known_nodes", "1")) >= REDIS_NODES
            for port in ports.redis
        )

    def _create_cluster(self, redis_cli: str, ports: ClusterPorts) -> None:
        addresses = [f"127.0.0.1:{port}" for port in ports.redis]
        result = subprocess.run(
            [redis_cli, "--cluster", "create", *addresses, "--cluster-replicas", "1"],
            input="yes\n",  # redis-cli asks before it assigns the slots
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise DevStackError(
                f"redis-cli --cluster create failed:\n{(result.stdout + result.stderr).strip()}"
            )

    def _cluster_state(self, ports: ClusterPorts) -> str:
        for port in ports.redis:
            state = _cluster_info(port).get("cluster_state")
            if state:
                return state
        return "-"

    def _ports_for_up(self) -> ClusterPorts:
        saved = self._load_ports()
        if saved is not None:
            return saved
        chosen: list[int] = []
        below = ephemeral_port_start()
        while len(set(chosen)) < 2 * KAFKA_NODES + REDIS_NODES:
            # a Redis Cluster node also listens on its port + 10000 (the cluster bus),
            # which must be free and below the ephemeral range too (devstack.process)
            port = find_free_port()
            if port + 10000 < below and port_is_free(port + 10000) and port not in chosen:
                chosen.append(port)
        ports = ClusterPorts(
            kafka=tuple(chosen[:KAFKA_NODES]),
            kafka_controllers=tuple(chosen[KAFKA_NODES : 2 * KAFKA_NODES]),
            redis=tuple(chosen[2 * KAFKA_NODES :]),
            kafka_cluster_id=new_cluster_id(),
        )
        self._ports_file.write_text(json.dumps(asdict(ports)) + "\n")
        return ports

    def _load_ports(self) -> ClusterPorts | None:
        try:
            raw = json.loads(self._ports_file.read_text())
            return ClusterPorts(
                kafka=tuple(raw["kafka"]),
                kafka_controllers=tuple(raw["kafka_controllers"]),
                redis=tuple(raw["redis"]),
                kafka_cluster_id=raw["kafka_cluster_id"],
            )
        except (FileNotFoundError, ValueError, TypeError, KeyError):
            return None

    def _require_ports(self) -> ClusterPorts:
        ports = self._load_ports()
        if ports is None:
            raise DevStackError(
                f"no cluster stack in {self.root}: start it with `creditgate dev up --cluster`"
            )
        return ports

    def _write_env(self, ports: ClusterPorts) -> None:
        lines = [
            f"# written by `creditgate dev up --cluster`; load with: set -a; . {self.env_file}"
        ]
        lines += [f"{name}={value}" for name, value in cluster_env(ports).items()]
        partial = self.env_file.with_name("env.partial")
        partial.write_text("\n".join(lines) + "\n")
        partial.replace(self.env_file)


def cluster_env(ports: ClusterPorts) -> dict[str, str]:
    """The settings' environment variables that point at a cluster stack."""
    return {
        "CREDITGATE_KAFKA_BOOTSTRAP": ports.kafka_bootstrap,
        "CREDITGATE_REDIS_URL": ports.redis_url,
        "CREDITGATE_REDIS_CLUSTER": "true",
    }


def _client(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0, decode_responses=True)


def _node_id(port: int) -> str:
    with _client(port) as client:
        return str(client.execute_command("CLUSTER MYID"))


def _cluster_info(port: int) -> dict[str, str]:
    """CLUSTER INFO of the node on `port`, or {} when it does not answer."""
    if not redis_answers(port):
        return {}
    try:
        with _client(port) as client:
            text = client.execute_command("CLUSTER INFO")
    except (redis.RedisError, OSError):
        return {}
    if isinstance(text, dict):
        return {str(k): str(v) for k, v in text.items()}
    return dict(line.split(":", 1) for line in str(text).splitlines() if ":" in line)


def _redis_role(port: int) -> str | None:
    """ "primary", or "replica of <port>" (ROLE), or None when the node does not answer."""
    try:
        with _client(port) as client:
            role = client.execute_command("ROLE")
    except (redis.RedisError, OSError):
        return None
    if role[0] == "slave":
        return f"replica of {role[2]}"
    return "primary" if role[0] == "master" else str(role[0])
