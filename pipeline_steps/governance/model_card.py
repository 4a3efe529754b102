"""A model version's card: intended use and limits, training data, metrics with intervals, subgroup and
lesion-size results, the gate decision and change record, and the failure modes its own metrics show.
Plain data in, a JSON-able card and an HTML page out (jinja2); `flows/model_card.py` gathers and logs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline_steps.core.subgroups import SIZE_BAND_LARGEST, SIZE_BANDS_MM, metric_key_part
from pipeline_steps.governance.ledger import jsonable

HEADLINE = (
    ("ap50", "AP@0.5"),
    ("sens_at_1fp", "FROC sensitivity at 1 FP/image"),
    ("cpm", "CPM (mean FROC sensitivity)"),
    ("auroc", "image AUROC"),
)
# A subgroup or lesion band this far below the overall sensitivity is named a failure mode.
WEAK_MARGIN = 0.1
MIN_IMAGES = 20  # smaller subgroups are shown, not called failure modes


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out == out else None


def subgroup_table(metrics: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """`subgroup.<attribute>.<value>.<metric>` keys as {attribute: {value: {metric: number}}}."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for key, value in metrics.items():
        parts = key.split(".")
        if parts[0] != "subgroup" or len(parts) < 4:
            continue
        attribute, group, metric = parts[1], ".".join(parts[2:-1]), parts[-1]
        out.setdefault(attribute, {}).setdefault(group, {})[metric] = _num(value)
    return {a: dict(sorted(v.items())) for a, v in sorted(out.items())}


# The lesion-size bands from the smallest up, by display name and by metric-key slug.
SIZE_ORDER = (*(name for name, _ in SIZE_BANDS_MM), SIZE_BAND_LARGEST)


def size_rank(band: str) -> int:
    """Where a band (display name, e.g. "<8mm", or metric slug, e.g. "lt8mm") sorts: smallest first;
    an unknown band last."""
    for rank, name in enumerate(SIZE_ORDER):
        if band in (name, metric_key_part(name)):
            return rank
    return len(SIZE_ORDER)


def by_size(table: Mapping[str, Any]) -> dict[str, Any]:
    """A {band: value} table ordered from the smallest band up."""
    return dict(sorted(table.items(), key=lambda item: (size_rank(item[0]), item[0])))


def lesion_table(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """`lesion_size.<band>.sens_at_1fp` as {band: sensitivity}, smallest band first."""
    return by_size(
        {
            key.split(".")[1]: _num(value)
            for key, value in metrics.items()
            if key.startswith("lesion_size.") and key.endswith(".sens_at_1fp")
        }
    )


def band_label(slug: str) -> str:
    """A lesion band's metric-key slug as a reader writes it: "lt8mm" is "< 8 mm", "gt_20mm"
    (the largest band, >= 20 mm) is ">= 20 mm"."""
    text = slug.replace("_", "")
    if text.startswith("lt"):
        text = "< " + text[2:]
    elif text.startswith("gt"):
        text = ">= " + text[2:]
    return text.replace("mm", " mm").strip()


def failure_modes(metrics: Mapping[str, Any]) -> list[str]:
    """What the version's own test metrics show it misses: lesion sizes and subgroups well below
    its overall sensitivity at 1 FP/image. Facts from the numbers, nothing more."""
    overall = _num(metrics.get("sens_at_1fp"))
    if overall is None:
        return ["the test split gave no sensitivity at 1 FP/image: no failure mode can be read"]
    out = []
    for band, value in lesion_table(metrics).items():
        if value is not None and value < overall - WEAK_MARGIN:
            out.append(
                f"lesions of {band_label(band)}: {value:.0%} found at 1 FP/image "
                f"(overall {overall:.0%})"
            )
    for attribute, groups in subgroup_table(metrics).items():
        for group, entry in groups.items():
            value, n = entry.get("sens_at_1fp"), entry.get("n_images") or 0
            if value is not None and n >= MIN_IMAGES and value < overall - WEAK_MARGIN:
                out.append(
                    f"{attribute} {group}: sensitivity {value:.0%} at 1 FP/image on {n:.0f} "
                    f"test images (overall {overall:.0%})"
                )
    return out


def build_card(
    *,
    model: str,
    version: str,
    tags: Mapping[str, str],
    metrics: Mapping[str, Any],
    intended_use: Mapping[str, Any],
    training_data: Mapping[str, Any],
    record: Mapping[str, Any],
    record_row: int,
    record_sha256: str,
) -> dict[str, Any]:
    """The card as plain data. `record` is the version's change record (its predicate)."""
    gate = dict(record.get("details", {}).get("gate", {}))
    return jsonable(
        {
            "model": {
                "name": model,
                "version": version,
                "data_version": tags.get("data_version"),
                "code_version": tags.get("code_version"),
                "params_hash": tags.get("params_hash"),
                "pseudonym_key": tags.get("pseudonym_key"),
            },
            "intended_use": dict(intended_use),
            "training_data": dict(training_data),
            "metrics": {
                name: {
                    "label": label,
                    "value": _num(metrics.get(name)),
                    "ci_low": _num(metrics.get(f"{name}_ci_low")),
                    "ci_high": _num(metrics.get(f"{name}_ci_high")),
                }
                for name, label in HEADLINE
            },
            "n_test_images": _num(metrics.get("n_images")),
            "subgroups": subgroup_table(metrics),
            "lesion_sizes": lesion_table(metrics),
            "gate": {
                "passed": gate.get("passed"),
                "reason": gate.get("reason"),
                "production": gate.get("production"),
            },
            "change_record": {
                "ledger_row": record_row,
                "sha256": record_sha256,
                "kind": record.get("kind"),
                "inside_plan": record.get("inside_plan"),
                "violations": list(record.get("violations") or ()),
                "accepted": record.get("accepted"),
                "acceptance": list(record.get("acceptance") or ()),
                "decision": record.get("decision"),
            },
            "known_failure_modes": failure_modes(metrics),
        }
    )


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Model card: {{ c.model.name }} version {{ c.model.version }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;line-height:1.4}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f3f3f3} td.n{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#176f2c;font-weight:600} .fail{color:#b3261e;font-weight:600} .muted{color:#777}
code{background:#f5f5f5;padding:0 .2em}
</style></head><body>
<h1>{{ c.model.name }} &middot; version {{ c.model.version }}</h1>
<p class="muted">data version <code>{{ c.model.data_version }}</code> &middot; code
<code>{{ c.model.code_version }}</code> &middot; params <code>{{ c.model.params_hash }}</code></p>

<h2>Intended use and limits</h2>
<p>{{ c.intended_use.purpose }}</p>
<ul>{% for item in c.intended_use.limits %}<li>{{ item }}</li>{% endfor %}</ul>

<h2>Training data</h2>
<table>
{% for key, value in c.training_data.items() %}
<tr><th>{{ key.replace('_', ' ') }}</th><td>{% if value is mapping %}{% for k, v in value.items() %}{{ k }}: {{ v }}{% if not loop.last %}, {% endif %}{% endfor %}{% else %}{{ value }}{% endif %}</td></tr>
{% endfor %}
</table>

<h2>Metrics on the test split{% if c.n_test_images %} ({{ c.n_test_images|int }} images){% endif %}</h2>
<table><tr><th>metric</th><th>value</th><th>95% interval</th></tr>
{% for name, m in c.metrics.items() %}
<tr><td>{{ m.label }}</td><td class="n">{{ fmt(m.value) }}</td>
<td class="n">{% if fmt(m.ci_low) != '-' %}[{{ fmt(m.ci_low) }}, {{ fmt(m.ci_high) }}]{% else %}<span class="muted">-</span>{% endif %}</td></tr>
{% endfor %}</table>

<h2>Lesion sizes (sensitivity at 1 FP/image)</h2>
{% if c.lesion_sizes %}<table><tr><th>diameter band</th><th>sensitivity</th></tr>
{% for band, v in c.lesion_sizes.items() %}<tr><td>{{ label(band) }}</td><td class="n">{{ fmt(v) }}</td></tr>{% endfor %}
</table>{% else %}<p class="muted">no lesions on the test split</p>{% endif %}

<h2>Subgroups</h2>
{% for attribute, groups in c.subgroups.items() %}
<h3>{{ attribute.replace('_', ' ') }}</h3>
<table><tr><th>group</th><th>images</th><th>AP@0.5</th><th>sensitivity at 1 FP/image</th><th>95% interval</th></tr>
{% for group, e in groups.items() %}
<tr><td>{{ group }}</td><td class="n">{{ e.n_images|int if e.n_images is not none else '-' }}</td>
<td class="n">{{ fmt(e.ap50) }}</td><td class="n">{{ fmt(e.sens_at_1fp) }}</td>
<td class="n">{% if fmt(e.sens_at_1fp_ci_low) != '-' %}[{{ fmt(e.sens_at_1fp_ci_low) }}, {{ fmt(e.sens_at_1fp_ci_high) }}]{% else %}-{% endif %}</td></tr>
{% endfor %}</table>
{% else %}<p class="muted">no subgroup results</p>{% endfor %}

<h2>Known failure modes</h2>
{% if c.known_failure_modes %}<ul>{% for f in c.known_failure_modes %}<li>{{ f }}</li>{% endfor %}</ul>
{% else %}<p>none stands out in this version's test metrics</p>{% endif %}

<h2>Gate decision and change control</h2>
<p>Gate: {% if c.gate.passed %}<span class="pass">passed</span>{% else %}<span class="fail">failed</span>{% endif %}
&middot; {{ (c.gate.reason or '').removeprefix('passed: ').removeprefix('failed: ') }}</p>
<p>Change record ({{ c.change_record.kind }}, ledger row {{ c.change_record.ledger_row }},
sha256 <code>{{ c.change_record.sha256[:16] }}…</code>):
{% if c.change_record.inside_plan %}<span class="pass">inside the plan</span>{% elif c.change_record.inside_plan is none %}not judged{% else %}<span class="fail">outside the plan</span>{% endif %}
&middot; decision: <b>{{ c.change_record.decision }}</b></p>
{% if c.change_record.violations %}<ul>{% for v in c.change_record.violations %}<li><code>{{ v.rule }}</code>: {{ v.detail }}</li>{% endfor %}</ul>{% endif %}
<table><tr><th>acceptance criterion</th><th>result</th><th>detail</th></tr>
{% for a in c.change_record.acceptance %}
<tr><td><code>{{ a.name }}</code></td><td>{% if a.passed %}<span class="pass">met</span>{% elif a.passed is none %}<span class="muted">not judged</span>{% else %}<span class="fail">not met</span>{% endif %}</td><td>{{ a.detail }}</td></tr>
{% endfor %}</table>
</body></html>
"""


def _fmt(value: Any) -> str:
    # Anything but a number (a missing key reaches here as jinja2's Undefined) shows as "-".
    number = _num(value) if isinstance(value, int | float | str) else None
    return "-" if number is None else f"{number:.3f}"


def render_html(card: Mapping[str, Any]) -> str:
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined)
    return env.from_string(TEMPLATE).render(c=card, fmt=_fmt, label=band_label)
