"""A local Apache Kafka (KRaft) and Redis, without Docker: one node each, or clusters.

`DevStack(Path(".devstack")).up()` starts both (or finds them running), waits
until they answer, writes `.devstack/env` and returns the `Endpoints`;
`down()` stops them and deletes their data. `DevStack(root, secure=True)` runs them
with logins, ACLs and TLS (see creditgate.devstack.secure). `ClusterStack(root)`
runs three Kafka nodes and a six-node Redis Cluster instead (creditgate.devstack.cluster).
"""

from creditgate.devstack.cluster import ClusterStack, ClusterStatus
from creditgate.devstack.errors import DevStackError
from creditgate.devstack.kafka import KAFKA_VERSION, default_jars_cache_dir, ensure_kafka_jars
from creditgate.devstack.process import find_free_port
from creditgate.devstack.stack import DevStack, Endpoints, StackSecurity, StackStatus

__all__ = [
    "KAFKA_VERSION",
    "ClusterStack",
    "ClusterStatus",
    "DevStack",
    "DevStackError",
    "Endpoints",
    "StackSecurity",
    "StackStatus",
    "default_jars_cache_dir",
    "ensure_kafka_jars",
    "find_free_port",
]
