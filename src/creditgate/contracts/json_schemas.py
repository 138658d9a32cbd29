"""JSON Schemas (draft 2020-12) of the topic values, generated from the models."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from creditgate.contracts.catalog import SCHEMA_DIALECT, ValueSchema


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
