"""Checks an adapter must pass before it enters a library bound to a base model."""

from __future__ import annotations

from .adapter import LoraAdapter
from .base_model import BaseModelSpec, model_display_name
from .errors import AdapterValidationError, BaseModelMismatchError

__all__ = ["check_against_base", "coerce_texts"]


def check_against_base(adapter: LoraAdapter, spec: BaseModelSpec, *, check_name: bool = True) -> None:
    """Every module exists in the base model with the same (d_out, d_in); the base names agree."""
    unknown = sorted(m for m in adapter.modules if m not in spec.modules)
    wrong = [f"{m}: adapter (d_out, d_in) = {adapter.shapes[m]}, base model {spec.modules[m]}"
             for m in sorted(adapter.modules) if m in spec.modules and adapter.shapes[m] != spec.modules[m]]
    if unknown or wrong:
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} module(s) not in the base model, e.g. {unknown[:3]}")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {wrong[:3]}")
        raise BaseModelMismatchError(
            f"adapter {adapter.name!r} does not fit base model {spec.name!r}: " + "; ".join(parts))
    theirs, ours = model_display_name(adapter.base_model), model_display_name(spec.name)
    if check_name and theirs and ours and theirs != ours:
        raise BaseModelMismatchError(
            f"adapter {adapter.name!r} was trained on {adapter.base_model!r}, the library's base model is "
            f"{spec.name!r} (shapes agree). If these are the same weights, create the library with the name "
            "check off, which it then remembers: CLI `library.check_base_name=false`, Python "
            "`LibraryConfig(check_base_name=False)`")


def coerce_texts(value, field: str) -> tuple[str, ...]:
    """A list of strings (a single string counts as one item)."""
    if isinstance(value, str):
        return (value,)
    try:
        items = tuple(value)
    except TypeError as exc:
        raise AdapterValidationError(f"{field} must be a list of strings, got {type(value).__name__}") from exc
    bad = [type(v).__name__ for v in items if not isinstance(v, str)]
    if bad:
        raise AdapterValidationError(f"{field} must be a list of strings; found {bad[0]}")
    return items
