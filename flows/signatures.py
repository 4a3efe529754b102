"""Model signatures as a user meets them: verify a version's files, and sign one deliberately (a
version registered before signing, or re-signed under a new key), recorded in the audit ledger."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flows import registry, tracking
from flows.anchoring import open_ledger
from pipeline_steps.core.config import Params
from pipeline_steps.core.layout import Layout
from pipeline_steps.governance.ledger import Entry
from pipeline_steps.governance.signing import NOT_SIGNED, SignatureCheck, SignatureError

SIGNED = "signature"  # the ledger kind of a deliberate signing


@dataclass(frozen=True)
class Verification:
    model_name: str
    version: str
    checks: tuple[SignatureCheck, ...]

    @property
    def ok(self) -> bool:
        return all(not c.problem for c in self.checks)

    @property
    def key_ids(self) -> list[str]:
        return sorted({c.key_id for c in self.checks if c.key_id})

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "version": self.version,
            "ok": self.ok,
            "key_id": ",".join(self.key_ids),
            "development": any(c.development for c in self.checks),
            "checks": [
                {
                    "model": c.model,
                    "ok": not c.problem,
                    "key_id": c.key_id,
                    "development": c.development,
                    "problem": c.problem,
                }
                for c in self.checks
            ],
        }


def verify_version(layout: Layout, params: Params, version: str) -> Verification:
    """Every logged model of `version` against its signature with the trusted keys."""
    name = params.register_.model_name
    registry.open_registry(layout, name).version(str(version))  # a clear error for a wrong number
    checks = tracking.check_signatures(layout, name, str(version))
    return Verification(name, str(version), tuple(checks))


def sign_deliberately(
    layout: Layout, params: Params, version: str, *, actor: str, reason: str, force: bool = False
) -> tuple[dict[str, str], Entry]:
    """Sign `version` with this machine's signing key and record who, why and what its files were
    before in the ledger. A version whose existing signature fails (files changed, unknown key) is
    signed only with `force`: signing would otherwise bless files nobody checked."""
    if not reason.strip():
        raise SignatureError(
            "A deliberate signing needs a reason (--reason): it goes to the ledger."
        )
    before = verify_version(layout, params, version)
    problems = [c for c in before.checks if c.problem and c.problem != NOT_SIGNED]
    unsigned = all(c.problem == NOT_SIGNED for c in before.checks)
    if problems and not force:
        detail = "; ".join(f"{c.model}: {c.problem}" for c in problems)
        raise SignatureError(
            f"{before.model_name} version {before.version} has a signature that does not verify "
            f"({detail}). Signing again would bless files that changed since; find out why, and "
            "pass --force only if you have checked them (recorded)."
        )
    info = registry.open_registry(layout, before.model_name).version(str(version))
    # The ledger is opened first: a signing nobody could record is not made.
    with open_ledger(layout.root) as ledger:
        tags = tracking.sign_version(layout, before.model_name, str(version))
        entry = ledger.append(
            SIGNED,
            f"{before.model_name}:{before.version}",
            {
                "model": before.model_name,
                "version": before.version,
                "run_id": info.run_id,
                "key_id": tags[tracking.SIGNATURE_KEY_TAG],
                "key": tags[tracking.SIGNATURE_TAG],
                "actor": actor,
                "reason": reason,
                "before": "unsigned"
                if unsigned
                else ("verified" if before.ok else "failed, forced"),
                "problems_before": [f"{c.model}: {c.problem}" for c in problems],
            },
        )
    return tags, entry
