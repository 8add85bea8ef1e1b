"""The offline jobs' per-image work on a Ray cluster (``--engine ray``).

Feature extraction (about 100 forwards per image with all mutants) and attacks dominate a build's
time and are independent per chunk of images, so they spread over Ray Data ``map_batches`` with a
pool of actors, each holding the bundle's model (and mutants) loaded once. The work is cut into the
same chunks as the single-process path (chunk ``c`` is images ``[c * size, (c + 1) * size)``, and an
attack seeds chunk ``c`` with ``seed + c``), so each actor runs exactly the calls the single process
would run and the results are equal, whatever the number of actors or the order they finish in.

Ray is imported only here and only when a job asks for this engine: a machine without ``ray``
runs every job single-process. Pointing at an existing cluster (``--ray-address ray://head:10001``
or ``auto``) needs the bundle at the same path on every node (a shared file system) and the
project installed in the workers' environment; ``docs/scaling.md`` says how.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.bundle import load_bundle
from models.errors import ConfigError
from models.gate import load_extractor

log = logging.getLogger("predgate.ray")

ENGINES = ("local", "ray")
# Passed to the workers, so a bring-your-own-model bundle finds its code there as it does here.
FORWARDED_ENV = ("PREDGATE_CODE_PATH", "PREDGATE_NO_PROGRESS")


def ray_module() -> Any:
    """The ``ray`` module, or a message saying how to install it."""
    try:
        import ray  # heavy (seconds to import): loaded only for --engine ray
    except ImportError as err:  # pragma: no cover - ray is a dependency; this guards slim installs
        raise ConfigError("--engine ray needs the ray package: pip install 'ray[data]'") from err
    return ray


@dataclass(frozen=True)
class RayEngine:
    """Where and how wide the work runs.

    ``address`` None starts a private local instance with ``local_cpus`` CPUs (None: all of this
    machine's); otherwise ``ray.init(address=...)`` joins an existing cluster (``auto`` for the
    one this machine belongs to). ``actors`` None gives one actor per GPU when the cluster has
    GPUs and one per ``cpus_per_actor`` CPUs otherwise; ``gpus_per_actor`` None asks for a whole
    GPU per actor exactly when the cluster has any (the actors then run on CUDA).
    """

    address: str | None = None
    actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None
    local_cpus: int | None = None
    progress: bool = False
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> dict[str, float]:
        """Connect (once) and return the cluster's resources."""
        ray = ray_module()
        if not ray.is_initialized():
            env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ} | self.env
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "logging_level": logging.WARNING,
                "runtime_env": {"env_vars": env} if env else None,
            }
            if self.address is None:
                kwargs["num_cpus"] = self.local_cpus or os.cpu_count() or 1
            else:
                kwargs["address"] = self.address
            try:
                ray.init(**kwargs)
            except ConnectionError as err:
                raise ConfigError(
                    f"cannot reach the Ray cluster at {self.address!r} ({err}); start it (ray start --head) "
                    "or leave --ray-address out for a local instance"
                ) from err
        ray.data.DataContext.get_current().enable_progress_bars = self.progress
        return dict(ray.cluster_resources())

    def plan(self, resources: dict[str, float]) -> tuple[int, float, str]:
        """Actor count, GPUs per actor and the actors' device for these cluster resources."""
        gpus = float(resources.get("GPU", 0.0))
        per_gpu = (1.0 if gpus >= 1 else 0.0) if self.gpus_per_actor is None else float(self.gpus_per_actor)
        if per_gpu > gpus:
            raise ConfigError(f"each actor asks for {per_gpu} GPUs but the cluster has {gpus}")
        if self.actors is not None:
            actors = int(self.actors)
        elif per_gpu > 0:
            actors = int(gpus // per_gpu)
        else:
            actors = int(float(resources.get("CPU", 1.0)) // self.cpus_per_actor)
        if actors < 1:
            raise ConfigError(f"no room for an actor: resources {resources}, {self.cpus_per_actor} CPUs each")
        return actors, per_gpu, "cuda" if per_gpu > 0 else "cpu"

    def map_chunks(
        self,
        worker: type,
        worker_kwargs: dict[str, Any],
        chunks: list[int],
    ) -> Iterator[dict[str, np.ndarray]]:
        """Run ``worker(**worker_kwargs, device=...)`` on these chunk ids, one call per chunk, on a
        pool of actors; yields each chunk's output (with its ``chunk`` column) as it arrives, in any
        order. Large inputs in ``worker_kwargs`` should be ``ray.put`` references."""
        ray = ray_module()
        if not chunks:
            return
        actors, per_gpu, device = self.plan(self.start())
        actors = max(1, min(actors, len(chunks)))
        items = [{"id": int(c)} for c in chunks]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            worker,
            fn_constructor_kwargs={**worker_kwargs, "device": device},
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=self.cpus_per_actor,
            num_gpus=per_gpu,
        )
        log.info("ray: %d chunks on %d actors (%s, %.2g GPUs each)", len(chunks), actors, device, per_gpu)
        pending: dict[int, list[dict[str, np.ndarray]]] = {}
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            # An output batch may hold rows of several chunks; hand each chunk on whole.
            for chunk in np.unique(batch["chunk"]):
                rows = batch["chunk"] == chunk
                pending.setdefault(int(chunk), []).append({k: v[rows] for k, v in batch.items()})
            for chunk in list(pending):
                parts = pending[chunk]
                if sum(len(p["chunk"]) for p in parts) >= int(parts[0]["rows"][0]):
                    del pending[chunk]
                    yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if pending:
            raise RuntimeError(f"ray returned incomplete chunks {sorted(pending)}")


def resolve(value: Any) -> Any:
    """A worker's argument itself: Ray Data hands constructor arguments over as given, so a
    ``ray.put`` reference (one copy of the images in the object store for all actors) is fetched here."""
    ray = ray_module()
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def chunk_rows(chunk: int, size: int, total: int) -> np.ndarray:
    """The image indices of ``chunk`` (the single-process path's slicing)."""
    return np.arange(chunk * size, min((chunk + 1) * size, total))


def tag_rows(chunk: int, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A worker's per-image output with the ``chunk`` and ``rows`` columns :meth:`map_chunks` groups by."""
    n = len(next(iter(out.values())))
    return {**out, "chunk": np.full(n, chunk, dtype=np.int64), "rows": np.full(n, n, dtype=np.int64)}


class EvidenceWorker:
    """An actor holding the bundle's extractor; one call extracts one chunk's evidence, as
    :func:`offline.features.extract_features` does for the same slice."""

    def __init__(
        self, bundle_path: str, images: np.ndarray, chunk_size: int, with_lcr: bool, device: str
    ) -> None:
        bundle = load_bundle(bundle_path)
        self.extractor = load_extractor(bundle, device)
        self.normalisation = bundle.normalisation
        self.images, self.chunk_size, self.with_lcr = resolve(images), chunk_size, with_lcr

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        chunk = int(batch["id"][0])
        idx = chunk_rows(chunk, self.chunk_size, len(self.images))
        x = self.normalisation.apply(self.images[idx])
        evidence = self.extractor(x, conductance=True, lcr=self.with_lcr, early_stop=False)
        assert evidence.conductance is not None
        out = {
            "index": idx,
            "logits": evidence.logits.cpu().numpy(),
            "prediction": evidence.prediction.cpu().numpy(),
            "conductance": evidence.conductance.cpu().numpy(),
        }
        if self.with_lcr:
            assert evidence.lcr is not None and evidence.mutant_labels is not None
            out["lcr"] = evidence.lcr.cpu().numpy()
            out["mutant_labels"] = evidence.mutant_labels.cpu().numpy().astype(np.int16).T  # rows = images
        return tag_rows(chunk, out)


def extract_features_on_ray(
    engine: RayEngine,
    bundle_path: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    with_lcr: bool,
    batch_size: int = 256,
) -> tuple[dict[str, np.ndarray], float]:
    """The columns of :func:`offline.features.extract_features` for these images, computed on
    Ray, and the seconds the extraction took (without connecting to the cluster)."""
    ray = ray_module()
    engine.start()
    start = time.perf_counter()
    n_chunks = -(-len(images) // batch_size)
    kwargs = {
        "bundle_path": str(bundle_path),
        "images": ray.put(images),
        "chunk_size": batch_size,
        "with_lcr": with_lcr,
    }
    chunks = sorted(
        engine.map_chunks(EvidenceWorker, kwargs, list(range(n_chunks))), key=lambda out: int(out["chunk"][0])
    )
    columns = ["logits", "prediction", "conductance"] + (["lcr", "mutant_labels"] if with_lcr else [])
    out = {key: np.concatenate([c[key] for c in chunks]) for key in columns}
    order = np.concatenate([c["index"] for c in chunks])
    if not np.array_equal(order, np.arange(len(images))):
        raise RuntimeError("ray returned the images out of order or incompletely")
    if with_lcr:
        out["mutant_labels"] = np.ascontiguousarray(out["mutant_labels"].T)  # back to mutants x images
    out["label"] = labels.astype(np.int64)
    return out, time.perf_counter() - start


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """``--engine`` and the Ray options, the same for every job that can spread its chunks."""
    parser.add_argument(
        "--engine",
        default="local",
        choices=list(ENGINES),
        help="local: this process; ray: chunks spread over a pool of Ray actors (same results)",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        help="with --engine ray: an existing cluster (auto, or ray://HEAD:10001); default a local instance",
    )
    parser.add_argument(
        "--ray-actors", type=int, default=None, help="actors (default: one per GPU, else per CPU)"
    )
    parser.add_argument(
        "--ray-gpus-per-actor",
        type=float,
        default=None,
        help="GPUs each actor reserves (default: 1 when the cluster has GPUs, else 0)",
    )


def engine_from(args: argparse.Namespace) -> RayEngine | None:
    """The Ray engine the arguments ask for, or None for the single-process path."""
    if getattr(args, "engine", "local") != "ray":
        for name in ("ray_address", "ray_actors", "ray_gpus_per_actor"):
            if getattr(args, name, None) is not None:
                raise ConfigError(f"--{name.replace('_', '-')} needs --engine ray")
        return None
    return RayEngine(address=args.ray_address, actors=args.ray_actors, gpus_per_actor=args.ray_gpus_per_actor)


def shutdown() -> None:
    """Leave the cluster (a local instance stops)."""
    ray = ray_module()
    if ray.is_initialized():
        ray.shutdown()
