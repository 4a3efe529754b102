"""The preprocess stage on a local Dask cluster (2 worker processes): same bytes as in-process."""

from __future__ import annotations

import os

import dask
import pytest

from pipeline_steps.core.config import PreprocessParams
from pipeline_steps.core.parallel import Crash, map_resilient
from pipeline_steps.preprocess import build_processed
from tests.unit.test_preprocess import _digest, _workspace

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    # A task whose worker dies is not rescheduled by the scheduler, so radflow's own retry runs.
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        LocalCluster(
            n_workers=2,
            processes=True,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=":0",
        ) as local,
    ):
        yield local


def test_dask_output_is_byte_identical_to_in_process(tmp_path, make_dicom, cluster, monkeypatch):
    from distributed import Client

    layout = _workspace(tmp_path, make_dicom, n=8)
    serial = build_processed(
        layout, PreprocessParams(workers=1, shard_size=3), cache_dir=tmp_path / "c1"
    )
    assert serial.stats.runner == "inline"
    expected = _digest(layout)

    on_dask = PreprocessParams(workers=1, shard_size=3, dask_address=cluster.scheduler_address)
    result = build_processed(layout, on_dask, cache_dir=tmp_path / "c2")
    assert result.stats.runner.startswith("dask ") and result.stats.decoded == 8
    assert _digest(layout) == expected
    with Client(cluster.scheduler_address, set_as_default=False) as client:
        ran = client.run_on_scheduler(
            lambda dask_scheduler: {
                name: sum(prefix.state_counts.values())
                for name, prefix in dask_scheduler.task_prefixes.items()
            }
        )
        assert ran.get("process_file", 0) >= 8, ran  # the images really went through the cluster

    # The tools' own variable selects the cluster when params leave the address empty.
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster.scheduler_address)
    again = build_processed(layout, PreprocessParams(shard_size=3), cache_dir=tmp_path / "c3")
    assert again.stats.runner.startswith("dask ") and _digest(layout) == expected


def _square_or_die(x: int) -> int:
    if x == 2:
        os._exit(3)  # the worker process dies mid-task
    return x * x


def test_a_killed_dask_worker_costs_only_its_own_item(cluster):
    from distributed import Client

    with Client(cluster.scheduler_address, set_as_default=False) as client:
        results = dict(
            map_resilient(
                _square_or_die,
                list(range(6)),
                lambda: client.get_executor(pure=False),
                slots=4,
                attempts=2,
            )
        )
    assert isinstance(results[2], Crash) and "KilledWorker" in results[2].message
    assert {i: r for i, r in results.items() if i != 2} == {i: i * i for i in range(6) if i != 2}
