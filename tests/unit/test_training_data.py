"""What the trainer feeds the detector: ingested images mixed with streamed synthetic studies (or
not), hard-negative crops, noise matched to the image's own, and the device profile."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline_steps.core.augment import MatchedNoise, RandomCrop, estimate_noise_std
from pipeline_steps.core.config import (
    DetectionParams,
    PreprocessParams,
    SynthParams,
    TrainParams,
    TrainSyntheticParams,
)
from pipeline_steps.core.detector import build_detector
from pipeline_steps.core.detector_eval import mine_hard_negatives
from pipeline_steps.core.device_profile import resolve_profile, visible_gpus
from pipeline_steps.core.errors import ConfigError
from pipeline_steps.core.train_input import (
    Stream,
    StreamLog,
    interleaved,
    make_train_dataset,
    samples_per_epoch,
    streamed_per_epoch,
)
from pipeline_steps.synthetic.stream import StudyProducer, stream_synth_params

S = 64


def _ingested(n: int, value: float = 0.25) -> list[tuple[np.ndarray, np.ndarray]]:
    # Constant images: any sample that is not exactly `value` came from elsewhere.
    return [(np.full((S, S), value, np.float32), np.zeros((0, 4), np.float32)) for _ in range(n)]


def test_interleaved_spreads_the_shorter_sequence_evenly() -> None:
    merged = list(interleaved(iter("aaaaaa"), 6, iter("bb"), 2))
    assert sorted(merged) == sorted("aaaaaabb")
    positions = [i for i, x in enumerate(merged) if x == "b"]
    assert positions[1] - positions[0] >= 3  # not bunched at one end
    assert list(interleaved(iter("ab"), 2, iter(""), 0)) == ["a", "b"]


def test_streamed_count_follows_the_fraction() -> None:
    params = TrainParams(synthetic=TrainSyntheticParams(fraction=0.5))
    assert streamed_per_epoch(params, 100) == 100
    assert (
        streamed_per_epoch(params.model_copy(update={"synthetic": TrainSyntheticParams()}), 100)
        == 0
    )
    crops = params.model_copy(update={"crop_size": 32, "crops_per_image": 2})
    assert samples_per_epoch(crops, 10, S) == (10 + 10) * 2


def test_mixing_off_trains_on_ingested_images_only() -> None:
    params = TrainParams(batch_size=4, augment=False, crop_size=0)
    dataset = make_train_dataset(lambda: iter(_ingested(6)), 6, S, params)
    images = np.concatenate([np.asarray(x) for x, _ in dataset])
    assert images.shape == (6, S, S, 1)
    assert np.all(images == np.float32(0.25))


def test_mixing_on_adds_each_epochs_streamed_studies_and_logs_them() -> None:
    preprocess = PreprocessParams(input_size=S, target_spacing_mm=5.0)
    stream_cfg = TrainSyntheticParams(fraction=0.5, native_size=256)
    params = TrainParams(batch_size=4, augment=False, crop_size=0, synthetic=stream_cfg)
    synth = stream_synth_params(SynthParams(native_size=(256, 256)), stream_cfg)
    log = StreamLog()
    with StudyProducer(synth, 5, preprocess, workers=0) as producer:
        stream = Stream(producer, synth, 5, streamed_per_epoch(params, 4))
        dataset = make_train_dataset(
            lambda: iter(_ingested(4)), 4, S, params, first_epoch=2, stream=stream, stream_log=log
        )
        images = np.concatenate([np.asarray(x) for x, _ in dataset])
    assert images.shape == (8, S, S, 1)
    constant = [bool(np.all(im == np.float32(0.25))) for im in images]
    assert sum(constant) == 4  # the 4 ingested images, and 4 radiographs that are not constant
    # Epoch 2 draws studies 8..11 (4 per epoch), each logged with its pixel hash.
    assert sorted(log.epochs[2]) == [8, 9, 10, 11]
    assert all(len(sha) == 64 for sha, _ in log.epochs[2].values())


def test_hard_negative_crops_are_centred_on_the_false_positive() -> None:
    image = np.zeros((S, S), np.float32)
    image[50, 12] = 1.0  # marks the false positive at x=12, y=50
    crop = RandomCrop(24)
    rng = np.random.default_rng(0)
    for _ in range(20):
        window, _ = crop(image, np.zeros((0, 4), np.float32), rng, np.array([12.0, 50.0]))
        assert window.max() == 1.0


def test_hard_negatives_are_fed_as_often_as_asked() -> None:
    examples = _ingested(2)
    examples[1][0][50, 12] = 1.0
    params = TrainParams(
        batch_size=8, crop_size=24, crops_per_image=8, hard_negative_fraction=0.9, augment=False
    )

    def crops(hard: dict[int, np.ndarray]) -> int:
        dataset = make_train_dataset(
            lambda: iter(examples), 2, S, params, hard_negatives=lambda: hard
        )
        return sum(int(np.sum(np.asarray(x).max(axis=(1, 2, 3)) == 1.0)) for x, _ in dataset)

    assert crops({1: np.array([[12.0, 50.0]], np.float32)}) >= 6  # ~90% of example 1's 8 crops
    assert crops({}) <= 4  # a random 24 px window rarely holds that one pixel


def test_mined_hard_negatives_are_false_positives_only() -> None:
    import keras

    keras.utils.set_random_seed(0)
    model = build_detector(S, TrainParams(width=4, depth=2))
    # A heatmap bias near 1 everywhere: every local maximum scores far above the floor.
    heat = model.get_layer("heatmap")
    kernel, bias = heat.get_weights()
    heat.set_weights([kernel * 0, bias * 0 + 5.0])
    lesion = np.array([[20, 20, 36, 36]], np.float32)
    examples = [(np.random.default_rng(1).random((S, S), dtype=np.float32), lesion)] * 2
    found = mine_hard_negatives(model, lambda: iter(examples), S, DetectionParams(), 2)
    assert set(found) == {0, 1}
    for centres in found.values():
        assert 1 <= len(centres) <= 3
        inside = (
            (centres[:, 0] >= 20)
            & (centres[:, 0] <= 36)
            & (centres[:, 1] >= 20)
            & (centres[:, 1] <= 36)
        )
        assert not inside.any()


def test_noise_estimate_finds_white_noise_and_ignores_smooth_anatomy() -> None:
    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.linspace(0.2, 0.8, 256), np.linspace(0.0, 0.1, 256))
    assert estimate_noise_std(ramp) < 1e-6
    noisy = ramp + rng.normal(0, 0.004, ramp.shape)
    assert estimate_noise_std(noisy) == pytest.approx(0.004, rel=0.05)
    padded = noisy.copy()
    padded[:, :40] = 0.0  # letterbox padding does not count
    assert estimate_noise_std(padded) == pytest.approx(0.004, rel=0.05)


def test_matched_noise_stays_at_the_images_own_noise_scale() -> None:
    rng = np.random.default_rng(1)
    image = (0.5 + rng.normal(0, 0.002, (128, 128))).astype(np.float32)
    for _ in range(10):
        out, _ = MatchedNoise(1.0)(image, np.zeros((0, 4), np.float32), rng)
        added = np.std(out - image)
        assert added <= 1.1 * 0.002  # never the 0.02 a fixed cap gave: 10x the real noise


def test_profile_resolves_to_cpu_settings_without_a_gpu() -> None:
    params = TrainParams()
    assert visible_gpus() == 0  # this suite runs without a GPU (gpu-marked tests cover one)
    effective, profile = resolve_profile(params, visible_gpus(), 256)
    assert profile.name == "cpu" and not profile.mixed_precision and not profile.jit_compile
    assert effective == params
    with pytest.raises(ConfigError, match="train.profile is gpu"):
        resolve_profile(params.model_copy(update={"profile": "gpu"}), 0, 256)


def test_gpu_profile_widens_the_model_and_batches() -> None:
    effective, profile = resolve_profile(TrainParams(), 1, 512)
    assert profile.name == "gpu" and profile.mixed_precision and profile.jit_compile
    assert effective.width == 2 * TrainParams().width
    assert effective.batch_size == 4 * TrainParams().batch_size
    assert effective.crop_size == 2 * TrainParams().crop_size
    # Crops as large as the image become whole images.
    whole, _ = resolve_profile(TrainParams(crop_size=128), 1, 256)
    assert whole.crop_size == 0
    cpu, cpu_profile = resolve_profile(TrainParams(profile="cpu"), 1, 256)
    assert cpu_profile.name == "cpu" and cpu == TrainParams(profile="cpu")


def test_stride_two_detector_predicts_and_trains_on_finer_cells() -> None:
    from pipeline_steps.core.detector import decode_detections, encode_targets, pack_targets

    params = TrainParams(
        width=4, depth=2, output_stride=2, batch_size=2, augment=False, crop_size=0
    )
    model = build_detector(S, params)
    assert model.predict_on_batch(np.zeros((1, S, S, 1), np.float32)).shape == (
        1,
        S // 2,
        S // 2,
        5,
    )
    # A 5 px box centred off the stride-4 grid decodes back exactly from stride-2 targets.
    box = np.array([[21.0, 30.0, 26.0, 35.0]], np.float32)
    packed = pack_targets(encode_targets(box, S, stride=2))
    outputs = np.concatenate([packed[..., :1], packed[..., 1:5]], axis=-1)[None]
    (decoded,) = decode_detections(outputs, DetectionParams(score_threshold=0.5), S)
    np.testing.assert_allclose(decoded[0, :4], box[0], atol=1e-4)
    examples = [(np.zeros((S, S), np.float32), box)] * 2
    (_, targets), *_ = make_train_dataset(lambda: iter(examples), 2, S, params)
    assert targets.shape == (2, S // 2, S // 2, 6)
