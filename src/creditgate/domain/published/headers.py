"""The CloudEvents headers every message carries."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from creditgate.domain.published.common import Time


class CloudEventsHeaders(BaseModel):
    """CloudEvents binary-mode headers of every message creditgate publishes (UTF-8)."""

    # other headers (tracing, say) may ride along
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    ce_specversion: Literal["1.0"]
    ce_id: str = Field(min_length=1, description="deterministic: a re-emitted copy keeps it")
    ce_type: str
    ce_source: Literal["creditgate"]
    ce_time: Time
    content_type: Literal["application/json"] | SkipJsonSchema[None] = Field(
        default=None, alias="content-type"
    )
