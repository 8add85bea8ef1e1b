"""``--engine ray``: features and attacks on a local Ray instance equal the single-process path.

One Ray instance (2 CPUs, two actors) serves the module; each test compares the Ray result with
the single-process one computed on copies of the same bundle, column by column.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cli.main import main
from models.bundle import load_bundle, load_features
from models.errors import ConfigError
from offline.attack import load_adversarial
from offline.ray_engine import RayEngine, engine_from, shutdown

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[RayEngine]:
    engine = RayEngine(local_cpus=2, actors=2)
    engine.start()
    yield engine
    shutdown()


def _copy(bundle: Path, out: Path) -> Path:
    """A copy of ``bundle`` whose test split's features are to be extracted again."""
    shutil.copytree(bundle, out)
    copy = load_bundle(out)
    for stage in ("features:test", "features:lcr"):
        del copy.manifest["stages"][stage]
    copy.save()
    return out


@pytest.mark.slow  # a Ray instance and its actors: about a minute; make test-all
def test_features_on_ray_equal_the_single_process_path(
    tiny_bundle: Path, tmp_path: Path, local_ray: RayEngine
) -> None:
    local, on_ray = _copy(tiny_bundle, tmp_path / "local"), _copy(tiny_bundle, tmp_path / "ray")
    # small chunks, so the split cuts into several chunks spread over both actors
    assert main(["features", "--bundle", str(local), "--batch-size", "48"]) == 0
    assert (
        main(
            [
                "features",
                "--bundle",
                str(on_ray),
                "--batch-size",
                "48",
                "--engine",
                "ray",
                "--ray-actors",
                "2",
            ]
        )
        == 0
    )
    want, got = load_features(load_bundle(local)), load_features(load_bundle(on_ray))
    assert set(want) == set(got) == {"fit", "val", "test"}
    columns = want["test"]
    assert set(columns) == set(got["test"])
    assert len(columns["label"]) > 2 * 48  # several chunks
    for key in ("label", "prediction", "mutant_labels", "mutants_used"):
        np.testing.assert_array_equal(got["test"][key], columns[key], err_msg=key)
    for key in ("logits", "conductance", "lcr", "lcr_full"):
        np.testing.assert_allclose(got["test"][key], columns[key], rtol=0, atol=1e-5, err_msg=key)
    assert load_bundle(on_ray).manifest["stages"]["features:test"]["engine"] == "ray"
    assert load_bundle(local).manifest["stages"]["features:test"]["engine"] == "local"


@pytest.mark.slow  # a Ray instance and its actors: about a minute; make test-all
def test_attack_on_ray_stores_the_single_process_images(
    tiny_bundle: Path, tmp_path: Path, local_ray: RayEngine
) -> None:
    local, on_ray = (
        shutil.copytree(tiny_bundle, tmp_path / "local"),
        shutil.copytree(tiny_bundle, tmp_path / "ray"),
    )
    common = [
        "attack",
        "--attack",
        "pgd-linf",
        "--eps",
        "0.1",
        "--steps",
        "3",
        "--images",
        "40",
        "--chunk-size",
        "20",
    ]
    assert main([*common, "--bundle", str(local)]) == 0
    assert main([*common, "--bundle", str(on_ray), "--engine", "ray"]) == 0
    tag = "pgd-linf-eps0.1-steps3-alpha0.0833333"
    want, got = load_adversarial(load_bundle(local), tag), load_adversarial(load_bundle(on_ray), tag)
    np.testing.assert_array_equal(got["index"], np.arange(40))
    for key in ("index", "images", "clean_prediction", "adv_prediction"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    np.testing.assert_allclose(got["pixels"], want["pixels"], rtol=0, atol=1e-6)
    summary_local = load_bundle(local).manifest["adversarial"][tag]
    summary_ray = load_bundle(on_ray).manifest["adversarial"][tag]
    assert summary_ray["success_rate"] == summary_local["success_rate"]


def test_ray_options_without_the_ray_engine_are_refused() -> None:
    args = argparse.Namespace(engine="local", ray_address="auto", ray_actors=None, ray_gpus_per_actor=None)
    with pytest.raises(ConfigError, match="--ray-address needs --engine ray"):
        engine_from(args)


def test_plan_uses_gpus_when_the_cluster_has_them() -> None:
    assert RayEngine().plan({"CPU": 16.0, "GPU": 2.0}) == (2, 1.0, "cuda")
    assert RayEngine().plan({"CPU": 4.0}) == (4, 0.0, "cpu")
    assert RayEngine(actors=3, gpus_per_actor=0.5).plan({"CPU": 8.0, "GPU": 1.0}) == (3, 0.5, "cuda")
    with pytest.raises(ConfigError, match="asks for 1.0 GPUs"):
        RayEngine(gpus_per_actor=1.0).plan({"CPU": 4.0})
