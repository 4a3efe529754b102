"""Synthetic dataset planning: patients, studies and identifiers."""

from __future__ import annotations

from pipeline_steps.synthetic.plan import ImageSpec, plan_dataset
from tests.unit.synthetic_common import SEED, SMALL


def test_images_group_into_patients_with_stable_demographics():
    specs = plan_dataset(SMALL.model_copy(update={"images_per_patient": (2, 4)}), 40, SEED)
    by_patient: dict[str, list[ImageSpec]] = {}
    for spec in specs:
        by_patient.setdefault(spec.patient.patient_id, []).append(spec)
    sizes = [len(v) for v in by_patient.values()]
    assert max(sizes) <= 4 and min(sizes[:-1]) >= 2  # the last patient may be cut short
    assert len({s.patient.sex for s in specs}) == 2
    for group in by_patient.values():
        assert len({(s.patient.name, s.patient.birth_date) for s in group}) == 1
        dates = [s.study_date for s in group]
        assert dates == sorted(dates) and len(set(dates)) == len(dates)
    uids = [uid for s in specs for uid in (s.study_uid, s.series_uid, s.sop_uid)]
    assert len(set(uids)) == len(uids) and all(u.startswith("2.25.") for u in uids)
    assert len({s.image_id for s in specs}) == len(specs)
    assert len({s.accession for s in specs}) == len(specs)
