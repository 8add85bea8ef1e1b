"""The service's settings: one pydantic-settings object read from ``PREDGATE_*`` environment variables.

Nothing else in the service reads the environment; tests build a :class:`Settings` directly and hand it
to :func:`service.main.create_app`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the online service (environment: ``PREDGATE_<NAME>``, e.g. ``PREDGATE_BUNDLE``)."""

    model_config = SettingsConfigDict(env_prefix="PREDGATE_", extra="ignore", frozen=True)

    bundle: Path = Field(description="directory of a finished bundle (predgate build)")
    signal_set: str | None = Field(
        None, description="signal set that makes the verdict; None = the bundle's default"
    )
    operating_point: str | None = Field(
        None, description="operating point name; None = the signal set's default"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when present")
    backend: Literal["torch", "onnx"] = Field(
        "torch",
        description="onnx: forward, shortcut conductance and mutants run on ONNX Runtime graphs "
        "exported at start",
    )
    max_batch_size: int = Field(32, ge=1, description="most images the gate runs in one batch")
    max_queue_delay_ms: float = Field(5.0, ge=0, description="longest wait for a batch to fill")
    single_thread_below: int = Field(
        8,
        ge=0,
        description="gate batches of fewer images run on one torch intra-op thread (0: never); a small "
        "batch cannot keep several threads busy and pays their hand-offs (bench.gate_threads measures it)",
    )
    queue_limit: int = Field(256, ge=1, description="most images waiting; beyond it requests get 503")
    batch_watchdog_s: float = Field(
        30.0, gt=0, description="a gate batch running longer than this is stuck: readiness off, new work 503"
    )
    liveness_stuck_s: float | None = Field(
        300.0,
        gt=0,
        description="a gate batch running longer than this fails liveness (/healthz 503) so that the "
        "orchestrator restarts the replica: a gate thread that never returns cannot be stopped any other "
        "way; above batch_watchdog_s; unset (null) = liveness never fails",
    )
    max_payload_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="largest request body (413 beyond)")
    max_images_per_request: int = Field(64, ge=1, description="most images in one /predict/batch call")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="largest decoded image (width x height)")
    api_key: SecretStr | None = Field(
        None, description="when set, predict routes need 'Authorization: Bearer <key>'"
    )
    api_keys: SecretStr | None = Field(
        None,
        description="comma-separated keys accepted as well as api_key (rotation: add the new key, move the "
        "clients, drop the old one); any key set turns bearer auth on",
    )
    rate_limit_per_s: float | None = Field(
        None,
        gt=0,
        description="requests per second each API key (or client address, without keys) may "
        "make to the predict routes (token bucket); None = no limit; beyond it 429 + Retry-After",
    )
    rate_limit_burst: int = Field(
        10, ge=1, description="size of each token bucket: requests a key may make at once after a pause"
    )
    request_timeout_s: float = Field(
        60.0,
        gt=0,
        description="deadline of a request without X-Request-Timeout (kept in request.state.deadline)",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="longest time to receive a request body; a trickling body gets 408"
    )
    cors_origins: str = Field(
        "", description="comma-separated origins allowed by CORS; empty (the default) = no CORS headers"
    )
    resize: Literal["crop", "refuse"] = Field(
        "crop", description="crop: shorter side to the input size + centre crop; refuse: 422 on other sizes"
    )
    warmup: bool = Field(True, description="run one full-evidence batch before reporting ready")
    host: str = Field("127.0.0.1", description="address uvicorn binds (0.0.0.0 in the container)")
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(
        1,
        ge=1,
        description="uvicorn worker processes, each with its own gate and batcher (metrics: multiprocess)",
    )
    drift_window: int = Field(
        1000, ge=2, description="answered images per signal set in the drift window (KS test vs val scores)"
    )
    drift_min_window: int = Field(
        100, ge=2, description="images the drift window needs before its gauges are exported"
    )
    log_level: str = "info"
    graceful_timeout_s: float = Field(
        30.0, gt=0, description="longest wait for in-flight requests on SIGTERM"
    )
    keep_alive_s: float = Field(
        75.0,
        gt=0,
        description="how long an idle keep-alive connection stays open. Longer than the idle pools of "
        "clients and proxies (httpx 5 s, nginx upstream 60 s), so that the server is never the side that "
        "closes a connection a client is reusing at that moment: that request would get no answer",
    )

    explain: Literal["none", "unknown", "all"] = Field(
        "none",
        description="which answers of /predict and /predict/batch carry an explanation when the request "
        "does not say (its `explain` option): none (answers stay lean), unknown (the answers sent to the "
        "fallback) or all. Each one costs a backward pass or more per image (docs/fallback.md)",
    )
    explain_method: Literal["saliency", "integrated_gradients", "grad_cam"] = Field(
        "grad_cam",
        description="attribution method of the explanations on /predict and the fallback items, and the "
        "default of /explain: grad_cam and saliency cost one backward pass, integrated_gradients "
        "explain_ig_steps",
    )
    explain_top_k_maps: int = Field(
        5, ge=1, le=1000, description="feature maps listed per class (predicted, runner-up) in an explanation"
    )
    explain_ig_steps: int = Field(
        16,
        ge=1,
        le=256,
        description="integration points of integrated gradients (each a forward and backward row per image)",
    )
    fallback_explain: bool = Field(
        True,
        description="every fallback item's meta carries the explanation of its image "
        "(method explain_method), computed before the item is stored; false leaves it out "
        "(the outbox write then costs no backward pass)",
    )

    fallback_url: str | None = Field(
        None,
        description="where every `unknown` image is delivered (POST, JSON, Idempotency-Key header); None = "
        "no fallback delivery. Items wait in a durable outbox under fallback_dir until acknowledged (2xx)",
    )
    fallback_dir: Path = Field(
        Path("data/fallback"),
        description="directory of the fallback outbox (SQLite, WAL); keep it on a volume",
    )
    fallback_redis_url: SecretStr | None = Field(
        None,
        description="None = the SQLite outbox under fallback_dir (the workers of one machine); "
        "redis://host:port/db = the outbox on Redis Streams, shared by several replicas (run Redis with "
        "appendonly yes, appendfsync always; docs/fallback.md). Start-up fails when it cannot be reached. "
        "Not with the review page, which keeps its labels in the SQLite outbox",
    )
    fallback_redis_prefix: str = Field(
        "predgate:fallback:",
        min_length=1,
        description="prefix of the Redis outbox's keys: replicas that share an outbox use the same one",
    )
    fallback_token: SecretStr | None = Field(None, description="bearer token sent to the fallback URL")
    fallback_timeout_s: float = Field(10.0, gt=0, description="time allowed for one delivery attempt")
    fallback_max_attempts: int = Field(
        10, ge=1, description="failed attempts after which an item is dead-lettered (kept, not retried)"
    )
    fallback_backoff_base_s: float = Field(
        0.5, gt=0, description="first retry waits up to this (full jitter)"
    )
    fallback_backoff_cap_s: float = Field(60.0, gt=0, description="longest wait between two attempts")
    fallback_lease_s: float = Field(
        30.0,
        gt=0,
        description="an item being delivered is leased this long; after a crash it is retried once the "
        "lease expires. Must exceed fallback_timeout_s, or another worker could send it while the first "
        "still waits",
    )

    review: bool = Field(
        False,
        description="serve the review page (/review): people label the rejected inputs stored in the outbox "
        "under fallback_dir. Without fallback_url the page is the fallback: every unknown image is stored "
        "for review, and a review marks it delivered",
    )
    review_page_size: int = Field(
        50, ge=1, le=1000, description="rejected inputs the review page lists at once"
    )

    cascade_bundle: Path | None = Field(
        None,
        description="directory of a second finished bundle (a bigger or differently trained model) that "
        "decides the images the primary gate answers `unknown`; its accepts answer with decided_by=cascade, "
        "the rest stay unknown (decided_by=none) and only those go to the fallback. Same input shape and "
        "class names as the primary; None = no cascade",
    )
    cascade_signal_set: str | None = Field(
        None,
        description="signal set of the cascade bundle that makes its verdict; None = that bundle's default",
    )
    cascade_operating_point: str | None = Field(
        None, description="operating point of that set; None = the set's default"
    )

    @model_validator(mode="after")
    def _lease_outlasts_an_attempt(self) -> Settings:
        if self.fallback_lease_s <= self.fallback_timeout_s:
            raise ValueError(
                f"fallback_lease_s ({self.fallback_lease_s:g}) must be greater than fallback_timeout_s "
                f"({self.fallback_timeout_s:g}): "
                "set PREDGATE_FALLBACK_LEASE_S above PREDGATE_FALLBACK_TIMEOUT_S"
            )
        return self

    @model_validator(mode="after")
    def _redis_outbox_is_usable(self) -> Settings:
        """A Redis URL the client can read, and no review page on it (the review page stores its labels
        beside the items in the SQLite outbox's file)."""
        if self.fallback_redis_url is not None:
            url = self.fallback_redis_url.get_secret_value()
            if not url.startswith(("redis://", "rediss://", "unix://")):
                raise ValueError(
                    "fallback_redis_url must be redis://host:port/db (rediss:// with TLS, unix:///path for a "
                    "socket): set PREDGATE_FALLBACK_REDIS_URL so"
                )
            if self.review:
                raise ValueError(
                    "review (the review page) keeps its labels in the SQLite outbox, so it cannot run on the "
                    "Redis outbox (fallback_redis_url): unset PREDGATE_FALLBACK_REDIS_URL to review on one "
                    "replica's SQLite outbox (PREDGATE_FALLBACK_DIR), or unset PREDGATE_REVIEW"
                )
        return self

    @model_validator(mode="after")
    def _liveness_after_readiness(self) -> Settings:
        """A stuck batch must turn readiness off (traffic moves away) before liveness restarts the replica."""
        if self.liveness_stuck_s is not None and self.liveness_stuck_s <= self.batch_watchdog_s:
            raise ValueError(
                f"liveness_stuck_s ({self.liveness_stuck_s:g}) must be greater than batch_watchdog_s "
                f"({self.batch_watchdog_s:g}): set PREDGATE_LIVENESS_STUCK_S above PREDGATE_BATCH_WATCHDOG_S"
            )
        return self

    @model_validator(mode="after")
    def _cascade_options_need_a_cascade(self) -> Settings:
        """A cascade signal set or point without a cascade bundle is a typo or a half-removed setting."""
        if self.cascade_bundle is None:
            named = [
                name
                for name in ("cascade_signal_set", "cascade_operating_point")
                if getattr(self, name) is not None
            ]
            if named:
                raise ValueError(
                    f"{' and '.join(named)} set without cascade_bundle: "
                    "set PREDGATE_CASCADE_BUNDLE to the second bundle's directory, "
                    f"or unset PREDGATE_{named[0].upper()}"
                )
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()  # type: ignore[call-arg]  # bundle comes from PREDGATE_BUNDLE
