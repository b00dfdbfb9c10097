"""Argument checks shared by the method configs and modules. Every failure is a ValueError that names where it
was raised (a config class or function), the argument, what was expected and what came."""

from __future__ import annotations


def require(where: str, name: str, ok: bool, expected: str, got) -> None:
    if not ok:
        raise ValueError(f"{where}: argument '{name}' must be {expected}, got {got!r}")


def is_int(value) -> bool:
    """An int that is not a bool (``True`` would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def count(where: str, name: str, value, allow_none: bool = False) -> None:
    """``value`` is an int >= 1 (or None when ``allow_none``)."""
    require(where, name, (allow_none and value is None) or (is_int(value) and value >= 1),
            "an int >= 1" + (" or None" if allow_none else ""), value)


def check_targets(where: str, name: str, value) -> None:
    """``value`` is None (the architecture's default targets) or a list of module names."""
    require(where, name, value is None or (isinstance(value, list) and all(isinstance(t, str) and t for t in value)),
            "None or a list of module names", value)


def check_lora_args(where: str, r, alpha, dropout, r_name: str = "r") -> None:
    """What every LoRA-family config and module takes: rank (AdaLoRA's is ``init_r``), alpha, dropout probability."""
    count(where, r_name, r)
    require(where, "alpha", is_number(alpha), "a number", alpha)
    require(where, "dropout", is_number(dropout) and 0 <= dropout < 1, "in [0, 1)", dropout)
