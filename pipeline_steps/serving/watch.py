"""The PACS watcher's bookkeeping (`radflow pacs watch`): which studies to ask for, which of their
instances are new and predictable, what an earlier attempt already recorded, and what was handled.

Plain functions over QIDO-RS answers (DICOM JSON), ledger payloads and one state file; the PACS
edge, the model and the ledger are `flows/pacs_watch.py`'s. Instances are remembered by their keyed
SOP Instance UID hash (`prediction.uid_hash`, the ledger's `sop_instance_uid_hash`), studies by a
keyed hash of theirs: the state file holds no UID.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from pipeline_steps.core.deid import pseudonym
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.files import write_text_atomic

STATE_VERSION = 1
STUDY_KIND = "study_instance_uid"  # the pseudonym kind of a study's keyed hash
# Structured reports (radflow's own included) are never predicted on: PS3.4 B.5's SR storage
# classes all start with this root, and Modality SR names the rest.
SR_CLASS_ROOT = "1.2.840.10008.5.1.4.1.1.88."
# DICOM JSON tags of the QIDO-RS answers read here.
TAG_STUDY = "0020000D"
TAG_SERIES = "0020000E"
TAG_SOP = "00080018"
TAG_SOP_CLASS = "00080016"
TAG_MODALITY = "00080060"
TAG_STUDY_INSTANCES = "00201208"  # NumberOfStudyRelatedInstances
INSTANCE_FIELDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality")
STUDY_FIELDS = ("StudyInstanceUID", "NumberOfStudyRelatedInstances")


class WatchStateError(DataError):
    """The watcher's state file cannot be read."""


# --------------------------------------------------------------------------------------------
# What to ask the PACS


def study_filters(modality: str, lookback_days: int, today: date) -> dict[str, str]:
    """QIDO-RS filters of one study search: studies holding `modality`, dated from `lookback_days`
    days before `today` onwards (0: any date; the handled set keeps old studies from repeating)."""
    filters = {"ModalitiesInStudy": modality}
    if lookback_days > 0:
        start = today - timedelta(days=lookback_days)
        filters["StudyDate"] = f"{start:%Y%m%d}-"
    return filters


def _value(item: Mapping[str, Any], tag: str) -> str:
    element = item.get(tag) or item.get(tag.lower()) or {}
    values = element.get("Value") or ()
    return str(values[0]) if values else ""


@dataclass(frozen=True)
class Study:
    uid: str  # kept in memory only: it names the study to the PACS
    key: str  # keyed hash: what the state file and the logs know it by
    instances: int  # NumberOfStudyRelatedInstances, -1 when the PACS does not say


def studies_from(answers: Iterable[Mapping[str, Any]], key: str) -> list[Study]:
    """The distinct studies of QIDO-RS study answers (one search per modality), in the PACS's order."""
    found: dict[str, Study] = {}
    for item in answers:
        uid = _value(item, TAG_STUDY)
        if not uid or uid in found:
            continue
        count = _value(item, TAG_STUDY_INSTANCES)
        found[uid] = Study(
            uid, pseudonym(uid, key, STUDY_KIND), int(count) if count.isdigit() else -1
        )
    return list(found.values())


@dataclass(frozen=True)
class Instance:
    series_uid: str
    sop_uid: str
    sop_class: str
    modality: str
    key: str  # prediction.uid_hash(sop_uid): the ledger's sop_instance_uid_hash

    @property
    def is_report(self) -> bool:
        return self.modality.upper() == "SR" or self.sop_class.startswith(SR_CLASS_ROOT)


def instances_from(
    answers: Iterable[Mapping[str, Any]], hash_uid: Callable[[str], str]
) -> list[Instance]:
    """The instances of a QIDO-RS instance search; `hash_uid(uid)` gives an instance's key."""
    found = []
    for item in answers:
        sop = _value(item, TAG_SOP)
        if not sop:
            continue
        found.append(
            Instance(
                _value(item, TAG_SERIES),
                sop,
                _value(item, TAG_SOP_CLASS),
                _value(item, TAG_MODALITY),
                hash_uid(sop),
            )
        )
    return found


# --------------------------------------------------------------------------------------------
# What an earlier attempt recorded


def recorded_predictions(
    payloads: Iterable[Mapping[str, Any]], model_name: str, model_version: str, keys: set[str]
) -> dict[str, dict[str, Any]]:
    """The first ledger payload per instance key in `keys` that `model_name` version `model_version`
    recorded for the watcher (it carries `sr_sop_instance_uid`, or an error reason): a crash after
    the ledger write and before the STOW is finished from it instead of being predicted again."""
    found: dict[str, dict[str, Any]] = {}
    for payload in payloads:
        key = str(payload.get("sop_instance_uid_hash") or "")
        model = payload.get("model") or {}
        if (
            key in keys
            and key not in found
            and payload.get("channel") == "pacs_watch"
            and str(model.get("name")) == model_name
            and str(model.get("version")) == str(model_version)
        ):
            found[key] = dict(payload)
    return found


# --------------------------------------------------------------------------------------------
# What was handled


@dataclass
class WatchState:
    """Instance keys handled (an SR stored, or refused with a reason), and per study key the
    instance count the PACS gave when every instance of it was handled: a study whose count has
    not changed is not listed again."""

    handled: dict[str, str] = field(default_factory=dict)  # instance key -> "sr" or reason code
    studies: dict[str, int] = field(default_factory=dict)  # study key -> instance count

    def unchanged(self, study: Study) -> bool:
        return study.instances >= 0 and self.studies.get(study.key) == study.instances

    def pending(self, instances: Sequence[Instance]) -> list[Instance]:
        """The instances still to handle: not handled before and not a structured report."""
        return [i for i in instances if not i.is_report and i.key not in self.handled]


def load_state(path: Path) -> WatchState:
    if not path.exists():
        return WatchState()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"version {data.get('version')!r}")
        return WatchState(
            {str(k): str(v) for k, v in data["handled"].items()},
            {str(k): int(v) for k, v in data["studies"].items()},
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WatchStateError(
            f"{path}: the PACS watcher's state cannot be read ({type(exc).__name__}: {exc}); "
            "move it aside to start over (every instance is then looked up in the ledger again, "
            "so none is predicted or stored twice)"
        ) from None


def save_state(path: Path, state: WatchState) -> None:
    """Atomically: a crash leaves the previous state, never half of one."""
    text = json.dumps(
        {"version": STATE_VERSION, "handled": state.handled, "studies": state.studies},
        sort_keys=True,
    )
    write_text_atomic(path, text)
