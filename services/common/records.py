"""Typed records on the internal topics: one validation point each way.

A producer builds its record as the `schemas.internal` model (validated where it is made) and encodes it
here; anything but a model instance is refused, so no hand-built dict reaches a topic. A consumer decodes
with the model it expects and gets either the model or an `InvalidRecord` saying why (its caller logs and
skips it, or parks it: a poison record never stops a consumer).
"""
from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError


M = TypeVar("M")


class InvalidRecord(ValueError):
    """A record that is not JSON or that its model rejects."""


def encode(record: BaseModel) -> bytes:
    """The record's wire bytes (JSON, times in the wire's format). TypeError for anything not a model."""
    if not isinstance(record, BaseModel):
        raise TypeError(f"internal records are schemas/ models, not {type(record).__name__}")
    return record.__pydantic_serializer__.to_json(record, exclude_none=False)


def decode(model: type[M] | TypeAdapter, value: bytes | None) -> M:
    """`value` parsed and validated as `model` (a model class or a TypeAdapter of a union)."""
    try:
        if isinstance(model, TypeAdapter):
            return model.validate_json(value or b"")
        return model.model_validate_json(value or b"")  # type: ignore[union-attr]
    except ValidationError as exc:
        raise InvalidRecord(_summary(exc)) from None


def _summary(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "record"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg')}{more}"


__all__ = ["InvalidRecord", "decode", "encode"]
