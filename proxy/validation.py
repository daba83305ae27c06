"""Declared validation for the relay's TOML files: one pydantic model per entry, one message per field.

pydantic fits these files because TOML values arrive already typed (strings, integers, arrays), so strict
mode plus `extra="forbid"` states each rule as a type. Its own error texts are not what an operator reads,
though: every field carries a `Says` with the one line it gets when it is wrong, and `FileEntry.check`
turns the first error into `<where>: <that line>`, checking fields in declaration order (then unknown
fields, reported first) so the message is the same whatever else is wrong in the entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError


@dataclass(frozen=True)
class Says:
    """`Annotated` metadata: the message a field gets when its value is refused."""

    message: str


class EntryError(ValueError):
    """One entry of a file is wrong; the message is one line naming the entry and the field, never a value."""


class FileEntry(BaseModel):
    """Base of a TOML entry model. Subclasses declare fields as `Annotated[type, Says("...")]`."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    # How a subclass words a non-table entry ("{where}" is filled in) and a list of unknown field names.
    NOT_A_TABLE: ClassVar[str] = "{where}: expected a table"

    @classmethod
    def unknown_fields(cls, names: list[str]) -> str:
        return f"unknown field(s) {', '.join(names)}"

    @classmethod
    def check(cls, entry: Any, where: str, context: dict[str, Any] | None = None) -> Self:
        """The validated entry, or an EntryError saying what is wrong with it and where."""
        if not isinstance(entry, dict):
            raise EntryError(cls.NOT_A_TABLE.format(where=where))
        try:
            return cls.model_validate(entry, context=context)
        except ValidationError as exc:
            raise EntryError(f"{where}: {cls.first_problem(exc)}") from None

    @classmethod
    def first_problem(cls, exc: ValidationError) -> str:
        errors = exc.errors(include_url=False, include_input=False)
        unknown = sorted(str(error["loc"][0]) for error in errors if error["type"] == "extra_forbidden")
        if unknown:
            return cls.unknown_fields(unknown)
        order = list(cls.model_fields)
        named = [error for error in errors if error["loc"] and error["loc"][0] in cls.model_fields]
        if not named:  # a model-wide validator of ours, or else pydantic's own words (never the input)
            return _own_message(errors[0]) or str(errors[0]["msg"])
        error = min(named, key=lambda error: order.index(str(error["loc"][0])))
        return _own_message(error) or says(cls, str(error["loc"][0]))

    @classmethod
    def messages(cls) -> dict[str, str]:
        """Every field's message, for the tests that hold each rule to its wording."""
        return {name: says(cls, name) for name in cls.model_fields}


def _own_message(error: Any) -> str | None:
    """A validator of ours raised ValueError: its text is already the message."""
    return str(error["ctx"]["error"]) if error["type"] == "value_error" else None


def says(model: type[BaseModel], name: str) -> str:
    for item in model.model_fields[name].metadata:
        if isinstance(item, Says):
            return item.message
    raise LookupError(f"{model.__name__}.{name} declares no Says(...) message")
