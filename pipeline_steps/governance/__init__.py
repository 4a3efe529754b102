"""Governance: model stages and their rules, the champion/challenger gate, the audit ledger, the served model."""
