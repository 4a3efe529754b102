"""The `change_control` section of params.yaml: the predetermined change control plan (what the pipeline
may change on its own, how a change is accepted, and whether it may reach production unattended)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The architecture: a change here is a new device, not a retrain, so the plan fixes it by default.
ARCHITECTURE_KEYS = (
    "train.width",
    "train.depth",
    "train.output_stride",
    "train.hessian_sigmas",
    "preprocess.input_size",
)
# Keys that change nothing a reviewer judges (seeds, parallelism, where work runs, names).
NEUTRAL_KEYS = (
    "train.seed",
    "train.synthetic.seed",
    "train.synthetic.workers",
    "train.profile",
    "synth.seed",
    "preprocess.workers",
    "preprocess.dask_address",
    "preprocess.retries",
    "preprocess.shard_size",
    "extract_features.*",
)


class ChangeControlParams(BaseModel):
    """The plan every retrain and gate decision is checked against (pipeline_steps/governance/
    change_control.py); the gate's own floors and champion comparison are part of its acceptance."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Modifications the pipeline may make on its own.
    allow_new_data: bool = True  # retrain on newly ingested studies (a new DVC data version)
    allow_removed_data: bool = False  # a retrain that drops studies the baseline trained on
    # Params (dotted, as `train.width`) that must equal the baseline version's.
    fixed: tuple[str, ...] = ARCHITECTURE_KEYS
    # Params that may move, each within [low, high] (inclusive).
    ranges: dict[str, tuple[float, float]] = {
        "train.epochs": (4.0, 64.0),
        "train.learning_rate": (0.0005, 0.01),
        "train.batch_size": (8.0, 64.0),
        "train.patience": (2.0, 16.0),
    }
    # Params (fnmatch patterns) that may change freely; any other change is outside the plan.
    may_change: tuple[str, ...] = NEUTRAL_KEYS
    # Acceptance criteria, besides the gate's floors (gate.thresholds) and comparison with production.
    floor_bound: Literal["point", "ci_low"] = "ci_low"  # what must reach each floor
    subgroup_metric: Literal["ap50", "sens_at_1fp"] = "sens_at_1fp"  # non-inferiority per subgroup
    subgroup_margin: float = Field(0.1, ge=0.0, le=1.0)  # candidate >= production - margin
    min_subgroup_images: int = Field(20, ge=1)  # smaller subgroups are reported, not judged
    require_validation: bool = True  # the data version's validation passed
    # true: a passing candidate inside the plan goes on to production; false: a person promotes it.
    auto_promote: bool = False

    @model_validator(mode="after")
    def _plan(self) -> ChangeControlParams:
        for key, (low, high) in self.ranges.items():
            if not low <= high:
                raise ValueError(f"ranges.{key}: low {low:g} is above high {high:g}")
        both = sorted(set(self.fixed) & set(self.ranges))
        if both:
            raise ValueError(f"{', '.join(both)}: both fixed and given a range; keep one")
        return self
