"""What a caller asks a scrape to extract: named selectors, each a CSS selector (the text of
every match, as a list) or a spec `{css, attr, all}` (an attribute instead of the text; the
first match alone unless `all`), checked before anything is enqueued."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from jobs.scrape.html import is_valid_selector

MAX_SELECTORS = 50
MAX_CSS_LENGTH = 512
ATTRIBUTE_NAME = r"^[A-Za-z_:][-A-Za-z0-9_:.]{0,63}$"


class SelectorSpec(BaseModel):
    """One named selector. A plain string stands for `{"css": ..., "all": true}` and is
    written back as that string."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    css: str = Field(min_length=1, max_length=MAX_CSS_LENGTH)
    attr: str | None = Field(
        None, pattern=ATTRIBUTE_NAME, description="an attribute (href, src, content...)"
    )
    all: bool = Field(False, description="every match as a list, not the first one")

    @model_validator(mode="before")
    @classmethod
    def _plain_css(cls, data: Any) -> Any:
        return {"css": data, "all": True} if isinstance(data, str) else data

    @model_serializer(mode="wrap")
    def _as_given(self, handler: SerializerFunctionWrapHandler) -> Any:
        return self.css if self.is_plain else handler(self)

    @property
    def is_plain(self) -> bool:
        return self.attr is None and self.all

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        """In /openapi.json: the plain string too."""
        spec = handler.resolve_ref_schema(handler(core_schema))
        plain = {"type": "string", "minLength": 1, "maxLength": MAX_CSS_LENGTH,
                 "description": "a CSS selector: the text of every match"}  # fmt: skip
        return {"anyOf": [plain, spec]}


def check_selectors(selectors: dict[str, SelectorSpec]) -> dict[str, SelectorSpec]:
    for name, spec in selectors.items():
        if not 1 <= len(name) <= 64:
            raise ValueError(f"selector name {name!r} must be 1 to 64 characters")
        if not is_valid_selector(spec.css):
            raise ValueError(f"selector {name!r} is not a valid CSS selector: {spec.css!r}")
    return selectors


# Named selectors whose matches a scrape extracts: {"headline": "h1", "links": {"css":
# "a.item", "attr": "href", "all": true}, ...}.
Selectors = Annotated[
    dict[str, SelectorSpec], Field(max_length=MAX_SELECTORS), AfterValidator(check_selectors)
]


def selectors_digest(selectors: dict[str, SelectorSpec]) -> str:
    """What a stored extraction was made with: a page answering 304 keeps its stored matches
    only for the same selectors ("" for none)."""
    if not selectors:
        return ""
    canonical = json.dumps(
        {name: spec.model_dump(mode="json") for name, spec in selectors.items()},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]
