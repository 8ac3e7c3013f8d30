"""The settings schema's building blocks: value checks that normalise a value or refuse it in one line naming the key.

A leaf module: config.py assembles the schema of params.yaml from these, and every method, model and data source
declares its own settings with them."""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Callable, NoReturn

from .errors import UserError


class ConfigError(UserError):
    """A bad value in params.yaml: the message names the key, what it must be and what it is."""


Check = Callable[[Any, str], Any]


def fail(key: str, want: str, got: Any) -> NoReturn:
    raise ConfigError(f"params.yaml: {key} must be {want}, got {got!r}")


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Check:
    """A real number; strings like '8/255' are accepted (eps and step sizes are usually written that way)."""
    lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
    hi_s = "" if hi is None else (f"< {hi}" if hi_open else f"<= {hi}")
    want = "a number" + (f" {lo_s}" if lo_s else "") + (f" and {hi_s}" if lo_s and hi_s else (f" {hi_s}" if hi_s else ""))

    def check(v: Any, key: str) -> float:
        if isinstance(v, str):
            try:
                v = float(Fraction(v.replace(" ", "")))
            except (ValueError, ZeroDivisionError, OverflowError):
                fail(key, want + " (or a fraction like 8/255)", v)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            fail(key, want, v)
        try:
            v = float(v)
        except OverflowError:  # an int too large for a float
            fail(key, want, v)
        if not math.isfinite(v):
            fail(key, "a finite " + want.removeprefix("a "), v)
        if lo is not None and (v <= lo if lo_open else v < lo):
            fail(key, want, v)
        if hi is not None and (v >= hi if hi_open else v > hi):
            fail(key, want, v)
        return v

    return check


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    want = "an integer" + (f" >= {lo}" if lo is not None else "") + (f" and <= {hi}" if hi is not None else "")

    def check(v: Any, key: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            fail(key, want, v)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            fail(key, want, v)
        return v

    return check


def choice(*options: Any) -> Check:
    def check(v: Any, key: str) -> Any:
        # YAML 1.1 (PyYAML) reads an unquoted off/on as false/true; YAML 1.2 writers (DVC's `exp run -S`) leave
        # them unquoted, so `autoattack: off` must mean "off"
        if v is False and "off" in options:
            return "off"
        if v is True and "on" in options:
            return "on"
        if isinstance(v, bool) and not any(isinstance(o, bool) for o in options):
            fail(key, "one of " + ", ".join(map(str, options)), v)
        if v not in options:
            fail(key, "one of " + ", ".join(map(str, options)), v)
        return v

    return check


def boolean(v: Any, key: str) -> bool:
    if not isinstance(v, bool):
        fail(key, "true or false", v)
    return v


def text(v: Any, key: str) -> str:
    if not isinstance(v, str) or not v:
        fail(key, "a non-empty string", v)
    return v


def optional(inner: Check) -> Check:
    def check(v: Any, key: str) -> Any:
        return None if v is None else inner(v, key)

    return check


def list_of(inner: Check, min_len: int = 0) -> Check:
    def check(v: Any, key: str) -> list:
        if not isinstance(v, list) or len(v) < min_len:
            fail(key, f"a list of at least {min_len} item(s)", v)
        return [inner(x, f"{key}[{i}]") for i, x in enumerate(v)]

    return check


def section(schema: dict[str, Check], defaults: dict[str, Any] | None = None, extra: Callable[[str], bool] | None = None,
            extra_check: Check | None = None) -> Check:
    """A mapping with known keys; unknown keys are refused with the list of allowed ones."""

    def check(v: Any, key: str) -> dict:
        if v is None:
            v = {}
        if not isinstance(v, dict):
            fail(key, "a mapping", v)
        out = dict(defaults or {})
        for k, val in v.items():
            sub = f"{key}.{k}" if key else str(k)
            if k in schema:
                out[k] = schema[k](val, sub)
            elif extra is not None and extra(k):
                out[k] = extra_check(val, sub) if extra_check else val
            else:
                allowed = ", ".join(sorted(schema)) or "none"
                raise ConfigError(f"params.yaml: unknown key {sub!r} (allowed here: {allowed})")
        return out

    return check
