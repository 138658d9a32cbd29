"""Apache Kafka from Maven Central, run with `java`: one KRaft node, or one of several.

Layout under the stack's root folder:

    kafka/server.properties   written at every start (the ports may change); 0600, as in
                              secure mode it holds the broker's own password
    kafka/log4j2.properties   written at every start
    kafka/data/               log.dirs: metadata and topic data, formatted once
    kafka.log                 the broker's log (log4j)
    kafka.out                 the JVM's stdout and stderr: crashes before logging starts
    kafka.pid
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from creditgate.devstack.errors import DevStackError
from creditgate.devstack.process import Daemon, require_executable, tail, write_private

# Must match the version in kafka-pom.xml; it names the jar cache folder.
KAFKA_VERSION = "4.1.1"

JARS_DIR_ENV = "CREDITGATE_KAFKA_JARS_DIR"

_MAVEN_TIMEOUT_SECONDS = 900.0
_FORMAT_TIMEOUT_SECONDS = 120.0
_API_VERSIONS_KEY = 18

_JAVA_HINT = (
    "install Java 17 or newer with `apt-get install -y openjdk-17-jre-headless`, or set JAVA_HOME"
)
_MAVEN_HINT = (
    "install it with `apt-get install -y maven` (it fetches the Kafka jars from Maven Central once)"
)

# Combined broker + controller on loopback. The internal topics' replication factor
# is the number of nodes (1 alone, 3 in a cluster: see `KafkaQuorum`); no initial
# rebalance delay so test consumers join at once; 4 offsets partitions instead of 50 so
# the group coordinator is ready sooner; topics only ever come from `creditgate topics
# apply`. A broker restarted after a crash waits until the controller has fenced its
# previous incarnation: a 4 s session (9 s by default) with 0.5 s heartbeats keeps crash
# tests short.
_SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id={node_id}
controller.quorum.voters={voters}
controller.listener.names=CONTROLLER
{listeners}
log.dirs={data_dir}
offsets.topic.replication.factor={replication}
offsets.topic.num.partitions=4
transaction.state.log.replication.factor={replication}
transaction.state.log.min.isr={min_isr}
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
num.partitions=1
broker.session.timeout.ms=4000
broker.heartbeat.interval.ms=500
"""

_PLAIN_LISTENERS = """\
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT"""

# Secure mode: clients log in with SCRAM-SHA-512 over TLS (the bootstrap port) or
# without TLS (a second port), and StandardAuthorizer refuses whatever no ACL allows.
# The broker logs in to itself as `admin` over SASL_PLAINTEXT. The controller
# listener stays PLAINTEXT on loopback, so the broker reaches its controller as
# ANONYMOUS: that principal must be a super user, and only that listener (which
# serves controller requests, not produce or fetch) can ever present it.
# SCRAM credentials live in the cluster metadata, written at format time.
_SECURE_LISTENERS = """\
listeners=SASL_SSL://127.0.0.1:{port},SASL_PLAINTEXT://127.0.0.1:{sasl_plaintext_port},\
CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=SASL_SSL://127.0.0.1:{port},SASL_PLAINTEXT://127.0.0.1:{sasl_plaintext_port}
listener.security.protocol.map=SASL_SSL:SASL_SSL,SASL_PLAINTEXT:SASL_PLAINTEXT,\
CONTROLLER:PLAINTEXT
inter.broker.listener.name=SASL_PLAINTEXT
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=\
org.apache.kafka.common.security.scram.ScramLoginModule required \
username="{admin_user}" password="{admin_password}";
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=\
org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PKCS12
ssl.keystore.location={keystore_file}
ssl.keystore.password={keystore_password}
ssl.key.password={keystore_password}
ssl.client.auth=none
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:{admin_user};User:ANONYMOUS"""

SCRAM_MECHANISM = "SCRAM-SHA-512"


@dataclass(frozen=True)
class KafkaSecurity:
    """What a secure node needs: its second client port, keystore and SCRAM users."""

    sasl_plaintext_port: int
    keystore_file: Path
    keystore_password: str = field(repr=False)
    admin_user: str
    admin_password: str = field(repr=False)
    # every SCRAM user to create at format time, the admin included: name -> password
    scram_users: Mapping[str, str] = field(repr=False)


# INFO for the broker's life cycle; WARN for what logs a line per request,
# per partition or per config dump (server.properties sits next to the log).
# log4j's own shutdown hook would close the log while Kafka's hook is still
# shutting down, losing its last lines; the file appender flushes every line.
_LOG4J2_PROPERTIES = """\
status = warn
shutdownHook = disable
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log_file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.partition.name = kafka.cluster.Partition
logger.partition.level = WARN
logger.fetchers.name = kafka.server.ReplicaFetcherManager
logger.fetchers.level = WARN
logger.alterlogdirs.name = kafka.server.ReplicaAlterLogDirsManager
logger.alterlogdirs.level = WARN
logger.storage.name = org.apache.kafka.storage.internals.log
logger.storage.level = WARN
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
"""


def default_jars_cache_dir() -> Path:
    """$CREDITGATE_KAFKA_JARS_DIR, else <project>/.cache/kafka, else ~/.cache/creditgate/kafka.

    The project is the nearest folder upwards from the working directory that
    holds a pyproject.toml.
    """
    configured = os.environ.get(JARS_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    cwd = Path.cwd()
    for folder in (cwd, *cwd.parents):
        if (folder / "pyproject.toml").is_file():
            return folder / ".cache" / "kafka"
    return Path.home() / ".cache" / "creditgate" / "kafka"


def ensure_kafka_jars(cache_dir: Path) -> Path:
    """The folder of Kafka's jars, fetched with Maven into `cache_dir` on first use.

    A marker holding the pom's hash is written after a complete fetch, so an
    interrupted fetch or a changed pom fetches again; a file lock lets
    parallel test workers share one fetch.
    """
    home = cache_dir / f"kafka-{KAFKA_VERSION}"
    libs = home / "libs"
    marker = home / "complete"
    pom = resources.files("creditgate.devstack").joinpath("kafka-pom.xml").read_bytes()
    stamp = hashlib.sha256(pom).hexdigest()
    if _read_text(marker) == stamp:
        return libs
    home.mkdir(parents=True, exist_ok=True)
    with _file_lock(home / ".lock"):
        if _read_text(marker) == stamp:
            return libs  # another process fetched while we waited for the lock
        marker.unlink(missing_ok=True)
        _fetch_jars(pom, home, libs)
        marker.write_text(stamp)
    return libs


def find_java() -> str:
    """$JAVA_HOME/bin/java if it exists, else `java` on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return require_executable("java", _JAVA_HINT)


def kafka_answers(port: int, timeout: float = 1.0) -> bool:
    """Whether a Kafka broker on 127.0.0.1:`port` answers an ApiVersions request.

    The broker opens its client listener only once it is unfenced and ready,
    and ApiVersions v0 is the one request every broker answers before any
    version negotiation, so one round trip is a cheap, exact readiness check.
    """
    client_id = b"creditgate-devstack"
    correlation_id = 1
    request = struct.pack(">hhih", _API_VERSIONS_KEY, 0, correlation_id, len(client_id))
    request += client_id
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(request)) + request)
            # size, correlation id, error code: enough to know who answered
            head = _receive_exactly(sock, 10)
    except OSError:
        return False
    _size, answered_id, error_code = struct.unpack(">iih", head)
    return bool(answered_id == correlation_id and error_code == 0)


@dataclass(frozen=True)
class KafkaQuorum:
    """The nodes of a KRaft cluster, each broker and controller, as one node sees them.

    A lone node is its own quorum (the default); in a cluster every node gets the same
    voters and cluster id, and its own `node_id`.
    """

    node_id: int = 1
    # node id -> controller port, of every voter (None: this node alone)
    voters: Mapping[int, int] | None = None
    cluster_id: str | None = None  # the same for all nodes of a cluster; None: a new one

    def voters_line(self, controller_port: int) -> str:
        voters = self.voters or {self.node_id: controller_port}
        return ",".join(f"{node}@127.0.0.1:{port}" for node, port in sorted(voters.items()))

    @property
    def size(self) -> int:
        return len(self.voters) if self.voters else 1


class KafkaNode:
    """One Kafka process in KRaft combined mode (broker and controller).

    `name` names its folder and files under the stack's root (`kafka`, or `kafka-2` for
    a cluster's second node)."""

    def __init__(
        self,
        root: Path,
        *,
        heap: str = "512m",
        name: str = "kafka",
        quorum: KafkaQuorum | None = None,
    ) -> None:
        self.home = root / name
        self.config_file = self.home / "server.properties"
        self.data_dir = self.home / "data"
        self.log_file = root / f"{name}.log"
        self._log4j_file = self.home / "log4j2.properties"
        self._heap = heap
        self.quorum = quorum or KafkaQuorum()
        self._daemon = Daemon(
            "Kafka",
            pid_file=root / f"{name}.pid",
            output_log=root / f"{name}.out",
            # The last argument, and unique to this stack unlike "kafka.Kafka".
            marker=str(self.config_file),
            other_logs=(self.log_file,),
        )

    @property
    def pid(self) -> int | None:
        return self._daemon.pid

    def start(
        self,
        libs: Path,
        *,
        port: int,
        controller_port: int,
        security: KafkaSecurity | None = None,
    ) -> None:
        """Write the config, format the storage on first start, start the JVM (no wait).

        With `security` the node runs in secure mode (see _SECURE_LISTENERS); its
        SCRAM users are created when the storage is formatted.
        """
        java = find_java()
        self.home.mkdir(parents=True, exist_ok=True)
        if security is None:
            listeners = _PLAIN_LISTENERS.format(port=port, controller_port=controller_port)
        else:
            listeners = _SECURE_LISTENERS.format(
                port=port,
                controller_port=controller_port,
                sasl_plaintext_port=security.sasl_plaintext_port,
                keystore_file=security.keystore_file,
                keystore_password=security.keystore_password,
                admin_user=security.admin_user,
                admin_password=security.admin_password,
            )
        replication = self.quorum.size
        properties = _SERVER_PROPERTIES.format(
            node_id=self.quorum.node_id,
            voters=self.quorum.voters_line(controller_port),
            listeners=listeners,
            data_dir=self.data_dir,
            replication=replication,
            min_isr=min(2, replication),
        )
        # In secure mode the file holds the admin's and the keystore's passwords.
        write_private(self.config_file, properties)
        self._log4j_file.write_text(_LOG4J2_PROPERTIES.format(log_file=self.log_file))
        if not (self.data_dir / "meta.properties").is_file():
            self._format_storage(java, libs, security)
        self._daemon.start(
            [
                java,
                f"-Xmx{self._heap}",
                # A broker out of memory should die and show as stopped, not limp on.
                "-XX:+ExitOnOutOfMemoryError",
                "-Djava.awt.headless=true",
                f"-Dkafka.logs.dir={self.log_file.parent}",
                f"-Dlog4j2.configurationFile={self._log4j_file}",
                "-cp",
                f"{libs}/*",
                "kafka.Kafka",
                str(self.config_file),
            ]
        )

    def wait_ready(self, port: int, timeout: float) -> None:
        self._daemon.wait_until(lambda: kafka_answers(port), timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Controlled shutdown (SIGTERM); SIGKILL after `timeout` seconds."""
        self._daemon.stop(timeout)

    def kill(self) -> None:
        """SIGKILL: the broker crashes and recovers its logs on the next start."""
        self._daemon.kill()

    def remove_data(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)

    def _format_storage(self, java: str, libs: Path, security: KafkaSecurity | None) -> None:
        scram: list[str] = []
        for name, password in (security.scram_users if security else {}).items():
            scram += ["--add-scram", f"{SCRAM_MECHANISM}=[name={name},password={password}]"]
        try:
            result = subprocess.run(
                [
                    java,
                    f"-Dlog4j2.configurationFile={self._log4j_file}",
                    "-cp",
                    f"{libs}/*",
                    "kafka.tools.StorageTool",
                    "format",
                    # Not --standalone: the voters are fixed by controller.quorum.voters.
                    "--cluster-id",
                    self.quorum.cluster_id or new_cluster_id(),
                    "--config",
                    str(self.config_file),
                    *scram,
                ],
                capture_output=True,
                text=True,
                timeout=_FORMAT_TIMEOUT_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise DevStackError(f"formatting the Kafka storage took over {exc.timeout:g}s") from exc
        if result.returncode != 0:
            raise DevStackError(
                f"formatting the Kafka storage in {self.data_dir} failed:\n"
                f"{(result.stdout + result.stderr).strip()}"
            )


def _fetch_jars(pom: bytes, home: Path, libs: Path) -> None:
    mvn = require_executable("mvn", _MAVEN_HINT)
    find_java()  # Maven runs on Java too: say so plainly rather than through Maven
    # Maven reads a copy of the pom beside the cache, never the installed package.
    pom_file = home / "pom.xml"
    pom_file.write_bytes(pom)
    # Copy into a staging folder and rename it, so `libs` is never half full.
    staging = home / "libs.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(libs, ignore_errors=True)
    output_file = home / "maven.log"
    try:
        with output_file.open("w") as output:
            result = subprocess.run(
                [
                    mvn,
                    "-q",
                    "-B",
                    "-f",
                    str(pom_file),
                    "dependency:copy-dependencies",
                    f"-DoutputDirectory={staging}",
                    "-DincludeScope=runtime",
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=_MAVEN_TIMEOUT_SECONDS,
                check=False,
            )
    except subprocess.TimeoutExpired as exc:
        raise DevStackError(
            f"Maven took over {exc.timeout:g}s to fetch Kafka {KAFKA_VERSION}; see {output_file}"
        ) from exc
    if result.returncode != 0:
        raise DevStackError(
            f"Maven could not fetch Kafka {KAFKA_VERSION} (is Maven Central reachable?):\n"
            f"{tail(output_file)}"
        )
    staging.rename(libs)


def new_cluster_id() -> str:
    # The format of Kafka's Uuid.randomUuid(): URL-safe base64 of 16 random
    # bytes without padding, never starting with "-" (it would read as an
    # option). Made here rather than by `StorageTool random-uuid` to save a
    # JVM start on every fresh `up`.
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed before a full answer")
        data += chunk
    return data


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
