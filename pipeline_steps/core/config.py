"""Typed configuration: `params.yaml` is read once into frozen pydantic models, one per stage."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline_steps.core.change_control_params import ChangeControlParams
from pipeline_steps.core.errors import ConfigError
from pipeline_steps.core.params_migrations import migrate

log = logging.getLogger(__name__)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LesionParams(_Section):
    """Nodule/opacity statistics, after NODE21: 6-30 mm, at most 3 per image, ~half negative."""

    positive_fraction: float = Field(0.5, ge=0.0, le=1.0)
    max_per_image: int = Field(3, ge=1, le=10)
    diameter_mm: tuple[float, float] = (6.0, 30.0)
    # Lesion density above the aerated lung it displaces, as extra water-equivalent cm per cm of
    # lesion thickness (difficulty knob): ~0.75 is a solid nodule, above 1 a dense or calcified one.
    contrast: tuple[float, float] = (0.6, 1.2)

    @model_validator(mode="after")
    def _ranges(self) -> LesionParams:
        for name in ("diameter_mm", "contrast"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be an increasing pair of positive numbers")
        return self


class SynthParams(_Section):
    """The embedded default dataset: synthetic chest radiographs written as DICOM."""

    n_images: int = Field(600, ge=1)
    seed: int = 20261123
    images_per_patient: tuple[int, int] = (1, 4)
    field_of_view_mm: float = Field(350.0, gt=100.0, le=500.0)
    native_size: tuple[int, int] = (1024, 1024)
    bits_stored: tuple[int, ...] = (10, 12, 14)
    monochrome1_fraction: float = Field(0.3, ge=0.0, le=1.0)
    rle_fraction: float = Field(0.25, ge=0.0, le=1.0)
    # Mean detected photons per pixel behind unattenuated paths (dose; lower = noisier).
    photons_per_pixel: float = Field(2.0e4, gt=0)
    # Strength of rib and vessel texture, the main difficulty knob (0 = none, 1 = realistic).
    texture: float = Field(1.0, ge=0.0, le=3.0)
    lesions: LesionParams = LesionParams()

    @model_validator(mode="after")
    def _shapes(self) -> SynthParams:
        lo, hi = self.images_per_patient
        if not 1 <= lo <= hi:
            raise ValueError("images_per_patient must be an increasing pair of counts >= 1")
        if min(self.native_size) < 256:
            raise ValueError("native_size must be at least 256 x 256 pixels")
        if not self.bits_stored or not all(8 <= b <= 16 for b in self.bits_stored):
            raise ValueError("bits_stored values must lie in 8..16 (BitsAllocated is 16)")
        return self


class IngestParams(_Section):
    allowed_modalities: tuple[str, ...] = ("DX", "CR")
    allowed_body_parts: tuple[str, ...] = ("CHEST",)
    min_size_px: int = Field(256, ge=16)
    # Used, and flagged, when neither PixelSpacing nor ImagerPixelSpacing is usable.
    default_spacing_mm: float = Field(0.35, gt=0.0, le=5.0)
    # VinDr-CXR: readers' boxes of one finding overlapping above this IoU are fused (WBF) into one.
    wbf_iou: float = Field(0.55, gt=0.0, lt=1.0)


# RSNA's one class, then VinDr-CXR's 14 local findings as the importer names them (snake_case).
DEFAULT_LABELS = (
    "opacity",
    "aortic_enlargement",
    "atelectasis",
    "calcification",
    "cardiomegaly",
    "consolidation",
    "ild",
    "infiltration",
    "lung_opacity",
    "nodule_mass",
    "other_lesion",
    "pleural_effusion",
    "pleural_thickening",
    "pneumothorax",
    "pulmonary_fibrosis",
)


class ValidateParams(_Section):
    min_images: int = Field(4, ge=1)
    positive_fraction: tuple[float, float] = (0.05, 0.95)
    pixel_spacing_mm: tuple[float, float] = (0.05, 1.0)
    size_px: tuple[int, int] = (256, 8192)
    # Finding classes a label may carry (`no_finding` is always allowed).
    allowed_labels: tuple[str, ...] = DEFAULT_LABELS
    # Physical box area: below ~2x2 mm no reader draws a finding; above ~40x40 cm is the whole film.
    box_area_mm2: tuple[float, float] = (4.0, 160000.0)
    # Training needs labels. False: a dataset without any labels passes (a warning), e.g. for
    # prediction, drift and feature statistics.
    require_labels: bool = True

    @model_validator(mode="after")
    def _ranges(self) -> ValidateParams:
        for name in ("positive_fraction", "pixel_spacing_mm", "size_px", "box_area_mm2"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be an increasing pair of non-negative numbers")
        return self


class SplitParams(_Section):
    """Patient-level split by salted hash (see preprocess.assign_split for why it is stateless)."""

    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    salt: str = "radflow-split-v1"
    # A split whose positive rate lies further than this many binomial standard errors from the
    # overall rate is reported as imbalanced (a warning: changing the salt re-splits everyone).
    balance_z: float = Field(3.0, gt=0.0)

    @model_validator(mode="after")
    def _sum(self) -> SplitParams:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave room for a train split")
        return self


class PreprocessParams(_Section):
    input_size: int = Field(256, ge=64, le=1024)
    target_spacing_mm: float = Field(1.4, gt=0.0, le=5.0)
    window: Literal["dicom", "percentile"] = "dicom"
    percentiles: tuple[float, float] = (0.5, 99.5)
    shard_size: int = Field(256, ge=1)
    workers: int = Field(0, ge=0, description="0 means one per CPU core")
    # A distributed scheduler (tcp://host:8786). Empty: DASK_SCHEDULER_ADDRESS if set, else the
    # local process pool. The output is byte-identical whichever runs it. Dask workers must see
    # the workspace's data/raw at the same path (a shared filesystem); results come back to the
    # caller, which alone writes the cache and the shards.
    dask_address: str = ""
    retries: int = Field(1, ge=0, le=5, description="re-runs of an image whose worker crashed")
    split: SplitParams = SplitParams()


class DriftParams(_Section):
    """Feature drift of new data against a reference feature table (pipeline_steps/core/drift.py)."""

    # Reference features.parquet (e.g. the champion's training data), relative to the workspace.
    # Empty: no comparison; the report says so.
    reference: str = ""
    bins: int = Field(10, ge=2, le=100, description="reference-quantile bins for PSI")
    psi: float = Field(0.2, gt=0.0, description="PSI above this flags a feature")
    ks: float = Field(0.15, gt=0.0, le=1.0, description="KS statistic above this flags a feature")
    min_drifted_features: int = Field(1, ge=1, description="flagged features that mean drift")


class ExtractFeaturesParams(_Section):
    histogram_quantiles: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)
    glcm_levels: int = Field(32, ge=2, le=256, description="grey levels of the co-occurrence")
    glcm_distances: tuple[int, ...] = (1, 4)
    # CNN embeddings from the backbone of the champion (registry alias `production`), when one is
    # registered; written to data/features/embeddings.parquet, outside DVC (pipeline_steps/extract_features.py).
    embeddings: bool = True
    drift: DriftParams = DriftParams()

    @model_validator(mode="after")
    def _values(self) -> ExtractFeaturesParams:
        if not all(0.0 <= q <= 1.0 for q in self.histogram_quantiles):
            raise ValueError("histogram_quantiles must lie in [0, 1]")
        if not self.glcm_distances or not all(1 <= d <= 64 for d in self.glcm_distances):
            raise ValueError("glcm_distances must be pixel offsets in 1..64")
        return self


class TrainSyntheticParams(_Section):
    """Freshly synthesised studies mixed into every training epoch (pipeline_steps/synthetic/stream.py).

    Each streamed study is identified by (generator version, the synth params below applied to the
    `synth` section, `seed`, index): the training manifest records them and `radflow trace` can
    regenerate any one bit for bit. Streamed seeds use their own random streams, so they never
    reproduce an image of the ingested dataset (nor its test split).
    """

    # Share of each epoch's training images that are streamed studies (0: ingested images only).
    # 0.5 adds as many fresh studies per epoch as there are ingested training images.
    fraction: float = Field(0.0, ge=0.0, le=0.9)
    seed: int = 1
    # Detector matrix of streamed studies: same field of view and dose per mm^2 as `synth`, on a
    # coarser grid (cheaper to render; must stay at least twice as fine as preprocess's spacing).
    native_size: int = Field(512, ge=256, le=4096)
    workers: int = Field(1, ge=0, le=16, description="producer processes; 0 = in the trainer")
    # The lesion statistics of streamed studies: biased to the small nodules the detector misses.
    lesions: LesionParams = LesionParams(positive_fraction=0.8, diameter_mm=(5.0, 20.0))


class TrainParams(_Section):
    """Detector training (pipeline_steps/train.py); width/depth size the network."""

    seed: int = 7
    epochs: int = Field(16, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    width: int = Field(24, ge=4, description="stem channels; stages double it, capped at 8x")
    depth: int = Field(4, ge=2, le=6, description="stride-2 stages after the stem")
    patience: int = Field(8, ge=1)
    monitor: Literal["val_ap", "val_loss"] = "val_ap"
    val_iou: float = Field(0.3, gt=0.0, le=1.0, description="IoU for a hit in val_ap")
    augment: bool = True
    # Train on square crops of this side (0: whole images). The network is fully
    # convolutional, so it still predicts whole images; a crop costs (crop/input)^2 of one.
    crop_size: int = Field(128, ge=0, description="training crop side in pixels; 0 = whole image")
    crops_per_image: int = Field(4, ge=1, le=16, description="crops drawn per image per epoch")
    # Share of crops placed to contain a lesion (of images that have one): positive oversampling.
    lesion_crop_fraction: float = Field(0.5, ge=0.0, le=1.0)
    shuffle_buffer: int = Field(256, ge=1, description="examples held for streaming shuffle")
    deterministic: bool = Field(True, description="TF op determinism (process-wide)")
    # Fixed gaussian-derivative (Hessian) input channels at these scales, in input pixels.
    hessian_sigmas: tuple[float, ...] = Field((), description="Hessian channel scales (px)")
    # Share of training samples that get one or two training lesions pasted in, shrunk to small
    # nodule size (core/augment.LesionPaste): more examples of the small nodules the detector misses.
    paste_fraction: float = Field(0.0, ge=0.0, le=1.0)
    # Noise augmentation as a multiple of each image's own noise (estimated from the image,
    # core/augment.estimate_noise_std): the added std is drawn up to noise_scale x that estimate.
    noise_scale: float = Field(1.0, ge=0.0, le=10.0)
    # Hard negatives: every `hard_negative_every` epochs the model's strongest false positives on
    # the training images are found, and this share of crops is centred on them.
    hard_negative_fraction: float = Field(0.0, ge=0.0, le=0.9)
    hard_negative_every: int = Field(2, ge=1)
    synthetic: TrainSyntheticParams = TrainSyntheticParams()
    # auto: the gpu profile (wider model, larger batches and crops, mixed precision, XLA) when
    # TensorFlow sees a GPU, else cpu (these params as written). Recorded with the run.
    profile: Literal["auto", "cpu", "gpu"] = "auto"
    # Output (heatmap) stride in input pixels: 2 adds a finer top-down level (cells of 2.8 mm at
    # 1.4 mm/px), for the centre precision that small boxes need at IoU 0.5.
    output_stride: Literal[2, 4] = 4


class BaselineParams(_Section):
    """The classical detector (pipeline_steps/core/baseline.py), fitted and scored in the test stage."""

    enabled: bool = True
    # Blob scales cover lesions of these diameters (NODE21-like nodules are 6-30 mm).
    diameter_mm: tuple[float, float] = (5.0, 32.0)
    n_scales: int = Field(9, ge=2, le=32)
    max_candidates: int = Field(100, ge=1, description="strongest LoG blobs kept per image")
    lung_margin_mm: float = Field(11.0, ge=0.0, description="chest wall cut from the lung mask")
    # Finer inputs are block-averaged to about this spacing first (constant cost per image).
    working_spacing_mm: float = Field(1.4, gt=0.0)
    positive_iou: float = Field(0.4, gt=0.0, le=1.0, description="IoU of a positive candidate")
    trees: int = Field(200, ge=1, description="boosting iterations of the blob classifier")

    @model_validator(mode="after")
    def _range(self) -> BaselineParams:
        lo, hi = self.diameter_mm
        if not 0 < lo < hi:
            raise ValueError("diameter_mm must be an increasing pair of positive numbers")
        return self


class DetectionParams(_Section):
    """The `test` section: how model outputs become boxes (score threshold, NMS, box cap, flip
    TTA), used alike by the test stage, validation during training and serving; and the classical
    baseline the test stage scores beside the detector."""

    score_threshold: float = Field(0.3, ge=0.0, le=1.0)
    # Metrics decode down to this score so FROC and AP see the whole curve, not only the
    # operating point; score_threshold stays the threshold predictions are served at.
    metrics_score_floor: float = Field(0.01, ge=0.0, le=1.0)
    # Per image, highest score first. 5 capped the FROC curve below 5 FP/image and could hide
    # false positives on cluttered images; at most 3 lesions per image, 20 leaves the curve free.
    max_detections: int = Field(20, ge=1)
    nms_iou: float = Field(0.3, gt=0.0, le=1.0)
    # Predict each image and its mirror and fuse the two (core/detector.fuse_flipped); twice the cost.
    flip_tta: bool = True
    baseline: BaselineParams = BaselineParams()


GateMetric = Literal["ap50", "cpm", "sens_at_1fp", "auroc"]
ThresholdMetric = Literal["ap50", "ap75", "map", "rsna", "cpm", "sens_at_1fp", "auroc"]


class GateParams(_Section):
    """Champion/challenger gate (pipeline_steps/gate.py): candidate vs production."""

    metric: GateMetric = "ap50"
    # Absolute floors the candidate must reach on the test split, whatever production does.
    thresholds: dict[ThresholdMetric, float] = {"ap50": 0.5, "sens_at_1fp": 0.6}
    min_delta: float = Field(0.0, ge=-1.0, le=1.0, description="candidate - production, at least")
    n_boot: int = Field(500, ge=20, description="patient-level paired bootstrap replicates")
    ci_level: float = Field(0.95, gt=0.5, lt=1.0)
    seed: int = 0


class RegisterParams(_Section):
    model_name: str = "radflow-detector"
    experiment: str = "radflow"


class NightlyParams(_Section):
    """Nightly retraining (flows/nightly.py): where new studies land, when, and who hears of a failure.

    S3 credentials and a non-AWS endpoint come from the environment (`AWS_*`, `AWS_ENDPOINT_URL_S3`)."""

    # s3://bucket/prefix new DICOMs (and label CSVs) are dropped into. Empty: no landing sync.
    landing: str = ""
    # Also pull new studies from the PACS (flows/pacs_pull.py: RADFLOW_PACS_*, params.pacs.pull).
    pacs: bool = False
    cron: str = "0 2 * * *"
    timezone: str = "UTC"
    # POSTed a JSON summary when a run fails (RADFLOW_WEBHOOK_URL overrides). Empty: a log line only.
    webhook_url: str = ""
    # Prefect global concurrency limit held while a run syncs, trains and promotes (with a server).
    concurrency_limit: str = "radflow-nightly"
    lock_wait_s: float = Field(0.0, ge=0.0, description="a second run waits this long, then skips")
    download_attempts: int = Field(4, ge=1, le=20, description="per S3 request, with backoff")
    retries: int = Field(2, ge=0, le=10, description="task retries (sync, push) after attempts")
    retry_delay_s: float = Field(10.0, ge=0.0, description="first task retry delay; doubles")

    @model_validator(mode="after")
    def _values(self) -> NightlyParams:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        if self.landing and not (
            self.landing.startswith("s3://") and self.landing[5:].split("/", 1)[0]
        ):
            raise ValueError("landing must be s3://bucket[/prefix] or empty")
        if len(self.cron.split()) != 5:
            raise ValueError("cron must have five fields (minute hour day month weekday)")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {self.timezone!r} is not an IANA name") from None
        if self.webhook_url and not self.webhook_url.startswith(("http://", "https://")):
            raise ValueError("webhook_url must be an http(s) URL or empty")
        return self


class PacsPullParams(_Section):
    """`radflow pacs pull` and the nightly run's PACS source (flows/pacs_pull.py): which studies are
    asked for over QIDO-RS. Everything pulled goes through ingestion's own screening."""

    modalities: tuple[str, ...] = ("DX", "CR")  # ModalitiesInStudy of the studies asked for
    study_date_from: str = ""  # YYYYMMDD, inclusive; empty: no lower bound
    study_date_to: str = ""  # YYYYMMDD, inclusive; empty: no upper bound

    @model_validator(mode="after")
    def _dates(self) -> PacsPullParams:
        for name in ("study_date_from", "study_date_to"):
            value = getattr(self, name)
            if value and not (len(value) == 8 and value.isdigit()):
                raise ValueError(f"{name} must be YYYYMMDD or empty")
        if (
            self.study_date_from
            and self.study_date_to
            and self.study_date_from > self.study_date_to
        ):
            raise ValueError("study_date_from is after study_date_to")
        return self


class PacsWatchParams(_Section):
    """`radflow pacs watch` (flows/pacs_watch.py): polling for new studies, and the SR stored back."""

    interval_s: float = Field(30.0, gt=0.0, le=86400.0)  # between polls
    modalities: tuple[str, ...] = ("DX", "CR")  # ModalitiesInStudy of the studies watched
    # Studies dated from this many days before today (the StudyDate window); 0: any date (the
    # handled set keeps studies from being predicted twice, but every poll lists them all).
    lookback_days: int = Field(2, ge=0, le=3650)
    series_number: int = Field(9001, ge=1, le=2**31 - 1)  # of the SR series radflow adds to a study
    # The operating point of the boxes stored in the PACS; None: the model version's own.
    score_threshold: float | None = Field(None, ge=0.0, le=1.0)


class PacsParams(_Section):
    """The PACS over DICOMweb (flows/pacs.py). Its URL and credentials come from the environment
    (RADFLOW_PACS_URL, RADFLOW_PACS_USER, RADFLOW_PACS_PASSWORD[_FILE]), never from this file."""

    pull: PacsPullParams = PacsPullParams()
    watch: PacsWatchParams = PacsWatchParams()
    timeout_s: float = Field(30.0, gt=0.0, le=600.0)  # per request
    attempts: int = Field(4, ge=1, le=20)  # per request, with exponential backoff
    backoff_s: float = Field(1.0, ge=0.0, le=60.0)  # the first retry's delay; doubles


class ReviewParams(_Section):
    """Reviewer feedback (flows/review_store.py, `radflow ingest --reviewed`): what is kept so a
    radiologist can read a prediction's image."""

    # Keep a copy (0600, by content id, .radflow/review/images/) of each predicted input that is not
    # already in data/raw, so the review console can show it and `radflow ingest --reviewed` can
    # make its reviewed findings labels. False: only images already in the dataset can be reviewed.
    keep_inputs: bool = True


class Params(_Section):
    synth: SynthParams = SynthParams()
    ingest: IngestParams = IngestParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    preprocess: PreprocessParams = PreprocessParams()
    extract_features: ExtractFeaturesParams = ExtractFeaturesParams()
    train: TrainParams = TrainParams()
    test: DetectionParams = DetectionParams()
    register_: RegisterParams = Field(RegisterParams(), alias="register")
    gate: GateParams = GateParams()
    nightly: NightlyParams = NightlyParams()
    pacs: PacsParams = PacsParams()
    review: ReviewParams = ReviewParams()
    change_control: ChangeControlParams = ChangeControlParams()

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def stage_hash(self, *sections: str) -> str:
        """Stable hash of the named sections (all when none are given)."""
        dumped = self.model_dump(mode="json", by_alias=True)
        chosen = {k: dumped[k] for k in (sections or tuple(sorted(dumped)))}
        blob = json.dumps(chosen, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def parse_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    """Validate a parsed params mapping; errors name the dotted key and the file."""
    raw = migrate(raw, source)
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<root>"
            problems.append(f"  {key}: {err['msg']}")
        raise ConfigError(
            f"{source}: invalid configuration\n"
            + "\n".join(problems)
            + "\nFix the key(s) above; see params.yaml in the radflow repository for defaults."
        ) from None


# Limits on params.yaml, checked while it is read and before anything is built from it. radflow's own
# file is about 15 KB and nests 4 levels deep; these leave room for comments and hand-made sections
# while refusing a file that would exhaust memory or Python's recursion (a RecursionError traceback
# was what a deeply nested file gave), or aliases that expand a few lines into millions of values.
MAX_PARAMS_BYTES = 1 << 20
MAX_PARAMS_DEPTH = 32
MAX_PARAMS_NODES = 100_000


class _TooDeep(Exception):
    def __init__(self, line: int) -> None:
        self.line = line


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that stops composing past MAX_PARAMS_DEPTH levels of nesting (its
    composer recurses once per level, so an unbounded file ends in a RecursionError)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        self._depth += 1
        try:
            if self._depth > MAX_PARAMS_DEPTH:
                raise _TooDeep(self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_shape(root: yaml.Node, source: str) -> None:
    """The composed document, aliases expanded, is at most MAX_PARAMS_DEPTH deep and
    MAX_PARAMS_NODES large; an alias inside its own anchor (a cycle) and a key given twice in one
    mapping (the later one silently wins in PyYAML) are refused."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    # Iterative post-order walk: children first, each node once (aliases share their node).
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if done:
            open_nodes.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            line = node.start_mark.line + 1
            if depth[key] > MAX_PARAMS_DEPTH:
                raise ConfigError(
                    f"{source}: line {line}: with its aliases expanded, the YAML nests deeper than "
                    f"{MAX_PARAMS_DEPTH} levels (radflow's sections nest at most 4); flatten it"
                )
            if size[key] > MAX_PARAMS_NODES:
                raise ConfigError(
                    f"{source}: line {line}: with its aliases expanded, the YAML holds more than "
                    f"{MAX_PARAMS_NODES} values; params.yaml has a few hundred. Remove the "
                    "aliases (*name) that repeat large blocks"
                )
            continue
        if key in size:
            continue
        if key in open_nodes:
            raise ConfigError(
                f"{source}: line {node.start_mark.line + 1}: an alias refers to the block that "
                "contains it (a cycle); params.yaml cannot hold recursive values"
            )
        open_nodes.add(key)
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for k, _ in node.value:
                if not isinstance(k, yaml.ScalarNode):
                    continue
                if (k.tag, k.value) in seen:
                    raise ConfigError(
                        f"{source}: line {k.start_mark.line + 1}: key {k.value[:80]!r} is given "
                        f"twice in one mapping (first on line {seen[k.tag, k.value]}); keep one"
                    )
                seen[k.tag, k.value] = k.start_mark.line + 1
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)


def _read_params_text(path: Path) -> str:
    """The file's text, at most MAX_PARAMS_BYTES, as UTF-8 (a UTF-8 byte-order mark is allowed)."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_PARAMS_BYTES + 1)
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot be read ({exc.strerror or type(exc).__name__})"
        ) from None
    if len(data) > MAX_PARAMS_BYTES:
        raise ConfigError(
            f"{path}: larger than the {MAX_PARAMS_BYTES // 1024} KiB limit of a parameters file "
            "(radflow's own is about 15 KiB); is it the right file?"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file "
            "as UTF-8"
        ) from None


def _parse_yaml(text: str, source: str) -> Any:
    loader: _BoundedLoader | None = None
    try:
        loader = _BoundedLoader(text)  # it already rejects unprintable characters
        node = loader.get_single_node()
        if node is None:
            return None
        _check_shape(node, source)
        return loader.construct_document(node)
    except _TooDeep as exc:
        raise ConfigError(
            f"{source}: line {exc.line}: the YAML nests deeper than {MAX_PARAMS_DEPTH} levels "
            "(radflow's sections nest at most 4); check its brackets and indentation"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({exc})") from None
    except (ValueError, TypeError, OverflowError) as exc:
        # Well-formed YAML whose value cannot be built, e.g. the date 2026-02-30.
        raise ConfigError(f"{source}: not valid YAML (a value cannot be read: {exc})") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_params(path: Path) -> Params:
    """Read `params.yaml` once. A missing file is an error; a missing section takes its defaults.

    The file is read within MAX_PARAMS_BYTES, MAX_PARAMS_DEPTH and MAX_PARAMS_NODES; anything it
    can hold ends in Params or a ConfigError naming the file (and the line where there is one)."""
    if not path.is_file():
        raise ConfigError(f"{path}: not found. Run `radflow init` or pass --workspace.")
    raw = _parse_yaml(_read_params_text(path), str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: top level must be a mapping of stage sections (`train:`, `test:`, ...), "
            f"not a {type(raw).__name__}"
        )
    return parse_params(raw, source=str(path))
