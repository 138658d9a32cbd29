"""The AsyncAPI 3.0 document of every topic and message, seen from creditgate."""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import version
from typing import Any

from creditgate.contracts.catalog import DEAD_LETTER, PAYLOAD_FORMAT, TOPIC_MESSAGES, Message
from creditgate.contracts.json_schemas import json_schema
from creditgate.domain import published as m
from creditgate.domain.ids import ID_PATTERN


def _payload(message: Message) -> dict[str, Any]:
    ref = "./" + message.value.path
    if not message.whole_file:
        ref += f"#/$defs/{message.model.__name__}"
    schema: dict[str, Any] = {"$ref": ref}
    if message.constraint:
        schema = {"allOf": [schema, message.constraint]}
    return {"schemaFormat": PAYLOAD_FORMAT, "schema": schema}


def _summary(message: Message) -> str:
    return message.summary or (message.model.__doc__ or message.id).strip().splitlines()[0]


def _message(message: Message) -> dict[str, Any]:
    key = "sourceKey" if message.value is DEAD_LETTER else "orgIdKey"
    body: dict[str, Any] = {
        "name": message.id,
        "title": message.id,
        "summary": _summary(message),
        "contentType": "application/json",
        "payload": _payload(message),
        "bindings": {"$ref": f"#/components/messageBindings/{key}"},
    }
    if message.ce_type:
        body["headers"] = {
            "allOf": [
                {"$ref": "#/components/schemas/CloudEventsHeaders"},
                {"properties": {"ce_type": {"const": message.ce_type}}},
            ]
        }
    return body


_INTEGER_CONFIGS = {
    "retention.ms",
    "retention.bytes",
    "delete.retention.ms",
    "max.message.bytes",
    "segment.ms",
}


def _kafka_channel(topic: dict[str, Any]) -> dict[str, Any]:
    configs: dict[str, Any] = {}
    for name, raw in topic.get("configs", {}).items():
        if name in _INTEGER_CONFIGS:
            configs[name] = int(raw)
        elif name == "cleanup.policy":
            configs[name] = str(raw).split(",")
        else:
            configs[name] = raw
    return {
        "topic": topic["name"],
        "partitions": topic["partitions"],
        "replicas": topic["replication_factor"],
        "topicConfiguration": configs,
        "bindingVersion": "0.5.0",
    }


def asyncapi_document(topics: Sequence[dict[str, Any]]) -> dict[str, Any]:
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    components: dict[str, Any] = {}
    for topic in topics:
        name = topic["name"]
        messages = TOPIC_MESSAGES[name]
        channels[name] = {
            "address": name,
            "description": ". ".join(filter(None, [topic.get("value"), topic.get("note")])),
            "messages": {msg.id: {"$ref": f"#/components/messages/{msg.id}"} for msg in messages},
            "bindings": {"kafka": _kafka_channel(topic)},
        }
        action, verb = (
            ("receive", "consumes") if topic["direction"] == "in" else ("send", "publishes")
        )
        operations[f"{action}.{name}"] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{name}"},
            "summary": f"creditgate {verb} {name}",
            "messages": [{"$ref": f"#/channels/{name}/messages/{msg.id}"} for msg in messages],
        }
        components.update({msg.id: _message(msg) for msg in messages})
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "creditgate",
            "version": version("creditgate"),
            "description": (
                "The credit meter's topics. Every message is keyed by org_id (UTF-8) so an "
                "organisation's traffic stays in order on one partition; values are UTF-8 "
                "JSON objects and unknown fields are rejected. Deployments may prefix every "
                "topic name (CREDITGATE_TOPIC_PREFIX)."
            ),
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": components,
            "schemas": {"CloudEventsHeaders": json_schema(m.CloudEventsHeaders)},
            "messageBindings": {
                "orgIdKey": {
                    "kafka": {
                        "key": {
                            "type": "string",
                            "pattern": ID_PATTERN,
                            "description": "the org_id of the message, UTF-8",
                        },
                        "bindingVersion": "0.5.0",
                    }
                },
                "sourceKey": {
                    "kafka": {
                        "key": {
                            "type": "string",
                            "description": "the key of the unreadable message as it came, "
                            "empty when it had none",
                        },
                        "bindingVersion": "0.5.0",
                    }
                },
            },
        },
    }
