"""The published contracts, generated: JSON Schemas of every topic's value, AsyncAPI and
the HTTP API's OpenAPI document.

The pydantic models (``domain/charges.py``, ``domain/commands.py``, ``domain/published/``)
and ``topics/*.json`` are the sources; this module writes from them

- ``topics/schemas/<value>.schema.json``: one JSON Schema (draft 2020-12) per kind of
  topic value, each message kind under ``$defs`` by its model's name;
- the ``"schema"`` field of each ``topics/<topic>.json``, pointing at that file;
- ``asyncapi.json``: an AsyncAPI 3.0 document of every topic and message, seen from
  creditgate (it receives requests and commands, sends everything else);
- ``src/creditgate/api/openapi.json``: the HTTP API's OpenAPI 3.1 document, its schemas
  from the models of ``api/schemas.py`` (``api/openapi.py``).

``python -m creditgate.contracts`` (or ``creditgate contracts generate``) writes them;
``check`` lists drift. Output is deterministic (sorted keys, fixed indentation), so the
unit test that regenerates in memory and compares fails on any drift.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, get_args

import click
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from creditgate.api.openapi import OPENAPI_FILE, openapi_document
from creditgate.domain import published as m
from creditgate.domain.charges import Action, ChargeRequest
from creditgate.domain.commands import (
    Grant,
    LicenseCommand,
    MemberRemove,
    MemberUpsert,
    SetCreditsAllowed,
    StartPeriod,
)
from creditgate.domain.ids import ID_PATTERN
from creditgate.errors import ConfigurationError, CreditgateError
from creditgate.stream import topics as t

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
# AsyncAPI's default schema format is draft-07-based; pydantic writes draft 2020-12
PAYLOAD_FORMAT = "application/schema+json;version=draft-2020-12"
SCHEMAS_DIR = "topics/schemas"
ASYNCAPI_FILE = "asyncapi.json"
DEAD_LETTER_TYPE = "deadletter"  # the ce_type of dead letters (stream/decider.py)
REGENERATE = "python -m creditgate.contracts  (or: creditgate contracts generate)"


@dataclass(frozen=True)
class ValueSchema:
    """One schema file: what a topic's value may be."""

    name: str
    type_: Any  # a model, or an annotated union of models
    title: str
    description: str

    @property
    def path(self) -> str:
        return f"{SCHEMAS_DIR}/{self.name}.schema.json"


@dataclass(frozen=True)
class Message:
    """One kind of message: an AsyncAPI message whose payload points into a schema file."""

    model: type[BaseModel]
    value: ValueSchema
    ce_type: str | None = None  # CloudEvents type header; None for input we consume
    whole_file: bool = False  # the payload is the whole file, not one of its $defs
    name: str = ""
    constraint: dict[str, Any] | None = None  # narrows the schema for this channel
    summary: str = ""  # else the first line of the model's docstring

    @property
    def id(self) -> str:
        return self.name or self.model.__name__


REQUEST = ValueSchema(
    "charge-request",
    ChargeRequest,
    "ChargeRequest",
    "A request to charge credits for an export, a CRM push or an email verification.",
)
COMMAND = ValueSchema(
    "license-command",
    LicenseCommand,
    "LicenseCommand",
    "A change to an organisation's license, credits or members; idempotent by command_id.",
)
RESULT = ValueSchema(
    "charge-result",
    m.ChargeResult,
    "ChargeResult",
    "The decision on a charge request: charge.approved or charge.rejected.",
)
EVENT = ValueSchema(
    "license-event",
    m.LicenseEvent,
    "LicenseEvent",
    "The outcome of a license command: command.applied or command.rejected.",
)
NOTIFICATION = ValueSchema(
    "notification",
    m.Notification,
    "Notification",
    "Something a user or the organisation's admins should hear about, by type.",
)
LEDGER = ValueSchema(
    "ledger-entry",
    m.LedgerEntry,
    "LedgerEntry",
    "One entry per decision and per command, applied or rejected, in per-org sequence; "
    "Redis state can be rebuilt from the ledger alone.",
)
DEAD_LETTER = ValueSchema(
    "dead-letter",
    m.DeadLetter,
    "DeadLetter",
    "Input that could not be read, with where it came from and why.",
)
VALUES = (REQUEST, COMMAND, RESULT, EVENT, NOTIFICATION, LEDGER, DEAD_LETTER)


def _literal(model: type[BaseModel], field: str) -> str:
    (value,) = get_args(model.model_fields[field].annotation)
    return str(value)


def _request(action: Action, name: str) -> Message:
    # one schema for the three request topics; each topic takes one action only
    return Message(
        ChargeRequest,
        REQUEST,
        whole_file=True,
        name=name,
        constraint={"properties": {"action": {"const": action.value}}},
        summary=f"A request to charge credits, with action {action.value}.",
    )


def _typed(value: ValueSchema, *models: type[BaseModel]) -> list[Message]:
    return [Message(model, value, ce_type=_literal(model, "type")) for model in models]


def _ledger(*models: type[BaseModel]) -> list[Message]:
    return [Message(model, LEDGER, ce_type=f"ledger.{_literal(model, 'kind')}") for model in models]


TOPIC_MESSAGES: dict[str, list[Message]] = {
    t.EXPORT_REQUESTS: [_request(Action.EXPORT, "ExportRequest")],
    t.PUSH_REQUESTS: [_request(Action.CRM_PUSH, "CrmPushRequest")],
    t.VERIFICATION_REQUESTS: [_request(Action.EMAIL_VERIFICATION, "VerificationRequest")],
    t.LICENSE_COMMANDS: [
        Message(StartPeriod, COMMAND),
        Message(Grant, COMMAND),
        Message(MemberUpsert, COMMAND, summary="Adds a member, or changes a member's role."),
        Message(MemberRemove, COMMAND, summary="Removes a member."),
        Message(
            SetCreditsAllowed,
            COMMAND,
            summary="An admin allows or disallows a member's use of the credits.",
        ),
    ],
    t.CHARGE_RESULTS: _typed(RESULT, m.ChargeApproved, m.ChargeRejected),
    t.LICENSE_EVENTS: _typed(EVENT, m.CommandApplied, m.CommandRejected),
    t.NOTIFICATIONS: _typed(
        NOTIFICATION,
        m.DisallowedNotification,
        m.InsufficientNotification,
        m.ThresholdNotification,
        m.PeriodStartedNotification,
        m.GrantedNotification,
    ),
    t.LEDGER: _ledger(
        m.ChargedEntry,
        m.RejectedEntry,
        m.ContinuedEntry,
        m.PeriodStartedEntry,
        m.GrantedEntry,
        m.MemberChangedEntry,
        m.CommandRejectedEntry,
    ),
    t.DEADLETTER: [Message(m.DeadLetter, DEAD_LETTER, ce_type=DEAD_LETTER_TYPE, whole_file=True)],
}


# ---- JSON Schemas ------------------------------------------------------------------------


def _nullable(schema: JsonSchemaValue) -> bool:
    kind = schema.get("type")
    return (
        kind == "null"
        or (isinstance(kind, list) and "null" in kind)
        or any(_nullable(branch) for branch in schema.get("anyOf", []))
    )


class _Schemas(GenerateJsonSchema):
    def field_title_should_be_set(
        self,
        schema: core_schema.CoreSchema
        | core_schema.ModelField
        | core_schema.DataclassField
        | core_schema.TypedDictField
        | core_schema.ComputedField,
    ) -> bool:
        # "Request Id" for request_id says nothing the property name does not
        return False

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        json_schema = super().default_schema(schema)
        # a key left out rather than set to null: null is not a value it may take
        if (
            "default" in json_schema
            and json_schema["default"] is None
            and not _nullable(json_schema)
        ):
            del json_schema["default"]
        return json_schema


def json_schema(type_: Any) -> dict[str, Any]:
    return TypeAdapter(type_).json_schema(schema_generator=_Schemas)


def value_schema(value: ValueSchema) -> dict[str, Any]:
    schema = {"$schema": SCHEMA_DIALECT, **json_schema(value.type_)}
    schema.setdefault("title", value.title)
    schema.setdefault("description", value.description)
    return schema


# ---- AsyncAPI ----------------------------------------------------------------------------


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


# ---- files ---------------------------------------------------------------------------


def _dump(data: Any, *, sort_keys: bool = True) -> str:
    return json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n"


def _topic_value(topic_name: str) -> ValueSchema:
    return TOPIC_MESSAGES[topic_name][0].value


def _topic_definitions(root: Path) -> dict[str, dict[str, Any]]:
    """``topics/*.json`` by path relative to ``root``, in name order."""
    return {
        path.relative_to(root).as_posix(): json.loads(path.read_text("utf-8"))
        for path in sorted((root / "topics").glob("*.json"))
    }


def render(root: Path) -> dict[str, str]:
    """Every generated file's text, by path relative to ``root``."""
    definitions = _topic_definitions(root)
    unknown = [d["name"] for d in definitions.values() if d["name"] not in TOPIC_MESSAGES]
    if unknown:
        raise ConfigurationError(
            f"no contract for topic(s) {', '.join(unknown)}: add them to "
            "creditgate.contracts.TOPIC_MESSAGES"
        )
    files = {value.path: _dump(value_schema(value)) for value in VALUES}
    for path, topic in definitions.items():
        # the schema field goes after the value it describes; the rest keeps its order
        pointer = _topic_value(topic["name"]).path.removeprefix("topics/")
        fields = [(k, v) for k, v in topic.items() if k != "schema"]
        at = next((i + 1 for i, (k, _) in enumerate(fields) if k == "value"), len(fields))
        fields.insert(at, ("schema", pointer))
        files[path] = _dump(dict(fields), sort_keys=False)
    files[ASYNCAPI_FILE] = _dump(asyncapi_document(list(definitions.values())))
    files[OPENAPI_FILE] = _dump(openapi_document(_Schemas))
    return files


def _stale(root: Path, files: dict[str, str]) -> list[str]:
    """Schema files in ``topics/schemas/`` that no model produces any more."""
    return [
        path.relative_to(root).as_posix()
        for path in sorted((root / SCHEMAS_DIR).glob("*.json"))
        if path.relative_to(root).as_posix() not in files
    ]


def _first_difference(a: str, b: str) -> int:
    pairs = zip(a.splitlines(), b.splitlines(), strict=False)
    return next(
        (n for n, (x, y) in enumerate(pairs, 1) if x != y), min(a.count("\n"), b.count("\n")) + 1
    )


def drift(root: Path) -> list[str]:
    """One line per generated file that differs from what the models produce now."""
    files = render(root)
    problems = []
    for path, text in files.items():
        target = root / path
        if not target.is_file():
            problems.append(f"{path} is missing")
        elif (committed := target.read_text("utf-8")) != text:
            line = _first_difference(committed, text)
            problems.append(f"{path} differs from the models (from line {line})")
    problems += [f"{path} is generated by no model" for path in _stale(root, files)]
    return problems


def generate(root: Path) -> list[str]:
    """Write every generated file that changed, remove stale ones; returns their paths."""
    files = render(root)
    changed = []
    for path, text in files.items():
        target = root / path
        if not target.is_file() or target.read_text("utf-8") != text:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, "utf-8")
            changed.append(path)
    for path in _stale(root, files):
        (root / path).unlink()
        changed.append(path)
    return changed


def default_root() -> Path:
    """The checkout this package runs from, else the working directory."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "topics").is_dir() else Path.cwd()


_root_option = click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="the repository root (default: this checkout)",
)


@click.group("contracts", invoke_without_command=True)
@_root_option
@click.pass_context
def contracts_command(ctx: click.Context, root: Path | None) -> None:
    """JSON Schemas, the AsyncAPI and the OpenAPI document, generated from the models."""
    ctx.obj = root or default_root()
    if ctx.invoked_subcommand is None:
        ctx.invoke(generate_command)


@contracts_command.command("generate")
@click.pass_obj
def generate_command(root: Path) -> None:
    """Write topics/schemas/*.schema.json, the topics' schema fields, asyncapi.json and
    src/creditgate/api/openapi.json."""
    try:
        changed = generate(root)
    except CreditgateError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo("written: " + ", ".join(changed) if changed else "contracts are up to date")


@contracts_command.command("check")
@click.pass_obj
def check_command(root: Path) -> None:
    """Fail when the committed contracts differ from the models."""
    try:
        problems = drift(root)
    except CreditgateError as exc:
        raise click.ClickException(str(exc)) from exc
    for problem in problems:
        click.echo(problem)
    if problems:
        raise click.ClickException(f"contracts drifted from the models: run {REGENERATE}")
    click.echo("contracts match the models")


if __name__ == "__main__":
    contracts_command()
