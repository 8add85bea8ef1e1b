"""What the running service holds: the loaded bundle and gate, the batcher, and the readiness flag.

Loading is separate from the app so that ``predgate serve`` can validate a bundle (and fail with a
message) before binding a port, and hand the loaded gate to the app instead of loading it twice.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import torch

from models.bundle import Bundle, load_bundle
from models.devices import resolve_device
from models.errors import ConfigError
from models.explanations import Explainer
from models.gate import Gate, load_gate
from models.image_input import InputContract
from service import metrics
from service.auth import KeyRing, RateLimiter, configured_keys
from service.batching import CASCADE_METRICS, PRIMARY_METRICS, BatcherMetrics
from service.cascade import Cascade, load_cascade
from service.drift import DriftGauges
from service.fallback.delivery import DeliveryPolicy, DeliveryWorker
from service.fallback.outbox import Outbox
from service.fallback.reviews import ReviewStore
from service.fallback.store import FallbackStore, open_store
from service.gate_batches import GateBatcher, gate_batcher
from service.schemas import BundleSummary
from service.settings import Settings

log = logging.getLogger("predgate.service")


@dataclass
class LoadedService:
    """A validated bundle, its gate on the chosen device, and the input contract requests must meet."""

    bundle: Bundle
    gate: Gate
    contract: InputContract
    device: torch.device
    drift: DriftGauges
    explainer: Explainer | None = None
    """Saliency / IG / Grad-CAM on a private copy of the CNN (None without a conductance layer)."""
    cascade: Cascade | None = None
    """The second bundle that decides the primary's ``unknown`` images (``cascade_bundle``), if any."""

    @property
    def bundle_id(self) -> str:
        return str(self.bundle.manifest["bundle_id"])


def load_service(settings: Settings) -> LoadedService:
    """Load and check everything the settings name.

    Raises
    ------
    BundleError
        The bundle is missing, incomplete, tampered with or has no detectors.
    ConfigError
        A setting names a signal set or operating point the bundle lacks, an unusable device, or an
        input policy the bundle's input shape does not allow; or the cascade bundle takes other inputs
        or names other classes than the primary (:func:`service.cascade.check_compatible`).
    """
    bundle = load_bundle(settings.bundle)
    sets = bundle.detectors.signal_sets if bundle.detectors is not None else {}
    if settings.signal_set is not None and sets and settings.signal_set not in sets:
        raise ConfigError(f"signal_set {settings.signal_set!r} is not in the bundle; stored: {sorted(sets)}")
    device = resolve_device(settings.device)
    gate = load_gate(bundle, device, settings.signal_set, backend=settings.backend)
    gate.signal_set(None).point(settings.operating_point)  # raises ConfigError naming the stored points
    contract = InputContract.from_shape(bundle.input_shape, settings.resize, settings.max_image_pixels)
    drift = DriftGauges(
        bundle,
        list(gate.signal_sets),
        settings.drift_window,
        min(settings.drift_min_window, settings.drift_window),
    )
    explainer = (
        Explainer.from_gate(gate, bundle, ig_steps=settings.explain_ig_steps)
        if gate.extractor.conductance is not None
        else None
    )
    cascade = None
    if settings.cascade_bundle is not None:
        cascade = load_cascade(
            settings.cascade_bundle,
            bundle,
            device,
            settings.cascade_signal_set,
            settings.cascade_operating_point,
            settings.backend,
        )
    return LoadedService(bundle, gate, contract, device, drift, explainer, cascade)


def _warm(gate: Gate, input_shape: tuple[int, int, int]) -> None:
    x = torch.zeros(1, *input_shape)
    extractor = gate.extractor
    full = extractor.conductance is not None and extractor.ensemble is not None
    gate.run(x, full_evidence=full)


def warm_up(loaded: LoadedService) -> None:
    """One pass through every stage the server may need (the cascade's too), so the first request is
    not the slow one."""
    _warm(loaded.gate, loaded.bundle.input_shape)
    if loaded.cascade is not None:
        _warm(loaded.cascade.gate, loaded.cascade.bundle.input_shape)


class ServiceState:
    """Lifecycle of one app: ``start`` loads (unless given), warms up and starts the batcher; ``stop``
    clears readiness, then drains the batcher."""

    def __init__(self, settings: Settings, loaded: LoadedService | None = None) -> None:
        self.settings = settings
        self.loaded = loaded
        self.batcher: GateBatcher | None = None
        self.cascade_batcher: GateBatcher | None = None
        self.bundle_summary: BundleSummary | None = None
        """``GET /v1/bundle``'s answer, built on its first call (bundle and settings are fixed)."""
        """The cascade gate's own queue and thread, so its runs never wait behind the primary's batches."""
        self.ready = False
        self.outbox: FallbackStore | None = None
        self.delivery: DeliveryWorker | None = None
        self.reviews: ReviewStore | None = None
        self.keys = KeyRing(configured_keys(settings))
        self.rate_limiter = (
            RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
            if settings.rate_limit_per_s is not None
            else None
        )

    def _batcher(
        self, gate: Gate, reports: BatcherMetrics = PRIMARY_METRICS, prefix: str = ""
    ) -> GateBatcher:
        return gate_batcher(
            gate,
            batcher_metrics=reports,
            stage_prefix=prefix,
            single_thread_below=self.settings.single_thread_below,
            max_batch_size=self.settings.max_batch_size,
            max_queue_delay_s=self.settings.max_queue_delay_ms / 1000.0,
            queue_limit=self.settings.queue_limit,
            watchdog_s=self.settings.batch_watchdog_s,
        )

    async def start(self) -> None:
        if self.loaded is None:
            self.loaded = await asyncio.to_thread(load_service, self.settings)
        if self.settings.warmup:
            await asyncio.to_thread(warm_up, self.loaded)
        self.batcher = self._batcher(self.loaded.gate)
        await self.batcher.start()
        cascade = self.loaded.cascade
        if cascade is not None:
            self.cascade_batcher = self._batcher(cascade.gate, CASCADE_METRICS, "cascade_")
            await self.cascade_batcher.start()
        if self.settings.fallback_url is not None or self.settings.review:
            await asyncio.to_thread(self._start_fallback, self.settings.fallback_url)
        gate = self.loaded.gate
        chosen = gate.signal_set(None)
        metrics.BUNDLE.info(
            {
                "bundle_id": self.loaded.bundle_id,
                "signal_set": chosen.name,
                "operating_point": chosen.point(self.settings.operating_point).name,
                "device": str(self.loaded.device),
                "backend": self.settings.backend,
                "cascade_bundle_id": cascade.bundle_id if cascade is not None else "",
            }
        )
        self.ready = True
        metrics.READY.set(1)
        log.info("predgate ready: bundle %s, signal set %s", self.loaded.bundle_id, chosen.name)
        if cascade is not None:
            log.info(
                "cascade: bundle %s decides the primary's unknowns (signal set %s, operating point %s)",
                cascade.bundle_id,
                cascade.signal_set,
                cascade.operating_point,
            )

    def _start_fallback(self, url: str | None) -> None:
        """Open the outbox (and the review store on it, with the review page), then, with a fallback URL,
        start the delivery thread, which replays what an earlier run left pending."""
        settings = self.settings
        if settings.review:  # the settings refuse the review page on the Redis outbox
            sqlite = Outbox(settings.fallback_dir)
            self.outbox, self.reviews = sqlite, ReviewStore(sqlite)
        else:
            redis_url = settings.fallback_redis_url
            self.outbox = open_store(
                settings.fallback_dir,
                None if redis_url is None else redis_url.get_secret_value(),
                settings.fallback_redis_prefix,
            )
        if url is None:
            log.info(
                "review page on, no fallback URL: unknown images wait in %s for a person",
                self.outbox.location,
            )
            return
        token = settings.fallback_token.get_secret_value() if settings.fallback_token is not None else None
        policy = DeliveryPolicy(
            url=url,
            timeout_s=settings.fallback_timeout_s,
            max_attempts=settings.fallback_max_attempts,
            backoff_base_s=settings.fallback_backoff_base_s,
            backoff_cap_s=settings.fallback_backoff_cap_s,
            lease_s=settings.fallback_lease_s,
            token=token,
        )
        self.delivery = DeliveryWorker(self.outbox, policy)
        counts = self.outbox.counts()
        log.info(
            "fallback delivery to %s: outbox %s, %d pending from earlier runs",
            url,
            self.outbox.location,
            counts.pending,
        )
        self.delivery.start()

    def not_ready_because(self) -> str | None:
        """Why readiness is false (None when ready): loading, shutting down, or a stuck gate batch."""
        if not self.ready or self.loaded is None:
            return "shutting down" if self.batcher is not None else "bundle loading or warming up"
        stuck = self._stuck_for()
        if stuck is not None:
            return (
                f"a gate batch has been running for {stuck:.1f} s, over the watchdog limit of "
                f"{self.settings.batch_watchdog_s:g} s"
            )
        return None

    def not_alive_because(self) -> str | None:
        """Why liveness is false (None when alive): a gate batch stuck past ``liveness_stuck_s``.

        The watchdog can only turn readiness off: a thread cannot be killed, so a batch that never returns
        would hold the replica forever. Failing liveness lets the orchestrator restart it.
        """
        limit = self.settings.liveness_stuck_s
        stuck = self._stuck_for()
        if limit is None or stuck is None or stuck <= limit:
            return None
        return (
            f"a gate batch has been running for {stuck:.1f} s, over the liveness limit of {limit:g} s: "
            "restart me"
        )

    def _stuck_for(self) -> float | None:
        """The longer stuck time of the primary's and the cascade's batchers (None when neither is stuck)."""
        times = [b.stuck_for() for b in (self.batcher, self.cascade_batcher) if b is not None]
        stuck = [t for t in times if t is not None]
        return max(stuck) if stuck else None

    async def stop(self) -> None:
        self.ready = False
        metrics.READY.set(0)
        if self.batcher is not None:
            await self.batcher.stop()  # its last rejects may still queue for the cascade, stopped after it
            log.info("predgate stopped: batching queue drained")
        if self.cascade_batcher is not None:
            await self.cascade_batcher.stop()
        if self.delivery is not None:  # pending items stay in the outbox for the next start
            await asyncio.to_thread(self.delivery.stop)
        if self.outbox is not None and self.reviews is None:  # a Redis consumer that holds nothing leaves
            await asyncio.to_thread(self.outbox.close)
