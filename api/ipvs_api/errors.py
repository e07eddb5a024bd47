"""Validation errors that name the offending field, the way the API server does."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldError:
    """One problem at one field path, e.g. ``spec.ports[0].port``."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class InvalidObject(ValueError):
    """An object that the API server would refuse; carries every field error found."""

    def __init__(self, kind: str, name: str, errors: list[FieldError]) -> None:
        self.kind = kind
        self.name = name
        self.errors = errors
        details = "; ".join(str(e) for e in errors)
        super().__init__(f'{kind} "{name}" is invalid: {details}')
