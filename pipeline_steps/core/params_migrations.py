"""Older params.yaml layouts still load: a key that moved is read from where it was, with a warning
that says what to change."""

from __future__ import annotations

import logging
from typing import Any

from pipeline_steps.core.errors import ConfigError

log = logging.getLogger("pipeline_steps.core.config")


def moved_gate_section(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The gate's section was `register.gate` before it became the `gate` stage's own: an older
    params.yaml still loads, with a warning that says what to change."""
    register = raw.get("register")
    if not (isinstance(register, dict) and "gate" in register):
        return raw
    if "gate" in raw:
        raise ConfigError(
            f"{source}: both `gate` and `register.gate` are set; keep only the top-level `gate` section"
        )
    log.warning(
        "%s: `register.gate` is now the top-level `gate` section (read from there this time); "
        "move it to silence this warning",
        source,
    )
    moved = {k: v for k, v in register.items() if k != "gate"}
    return {**raw, "register": moved, "gate": register["gate"]}


def moved_auto_promote(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """`gate.auto_promote` became `change_control.auto_promote` (promotion follows the plan): an older
    params.yaml still loads, with a warning that says what to change."""
    gate = raw.get("gate")
    if not (isinstance(gate, dict) and "auto_promote" in gate):
        return raw
    plan = raw.get("change_control") or {}
    if not isinstance(plan, dict):
        return raw
    if "auto_promote" in plan:
        raise ConfigError(
            f"{source}: both `gate.auto_promote` and `change_control.auto_promote` are set; keep "
            "only `change_control.auto_promote`"
        )
    log.warning(
        "%s: `gate.auto_promote` is now `change_control.auto_promote` (read from there this time); "
        "move it to silence this warning",
        source,
    )
    moved = {k: v for k, v in gate.items() if k != "auto_promote"}
    return {**raw, "gate": moved, "change_control": {**plan, "auto_promote": gate["auto_promote"]}}


def migrate(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """`raw` with every moved key in its current place."""
    return moved_auto_promote(moved_gate_section(raw, source), source)
