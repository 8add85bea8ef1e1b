"""Pydantic models of every request and response body (they are the OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ExplainMode = Literal["none", "unknown", "all"]
ExplainMethod = Literal["saliency", "integrated_gradients", "grad_cam"]


class PredictOptions(BaseModel):
    """Per-request options; each may also come as a query parameter (a body value wins)."""

    model_config = ConfigDict(extra="forbid")

    signal_set: str | None = Field(
        None, min_length=1, description="signal set that makes the verdict (default: the server's)"
    )
    operating_point: str | None = Field(
        None, min_length=1, description="operating point of that set (default: the set's)"
    )
    full_evidence: bool | None = Field(
        None,
        description="compute and return the conductance vector and LCR whatever the signal set (costs more)",
    )
    return_conductance: bool | None = Field(
        None, description="return the conductance vector (implies full evidence)"
    )
    top_k: int | None = Field(None, ge=1, le=1000, description="how many top classes to list (default 3)")
    explain: ExplainMode | None = Field(
        None,
        description="which answers carry an `explanation`: none, unknown (verdict unknown only) or all "
        "(default: the server's explain setting, none unless configured)",
    )


def _exactly_one(first: str, first_type: str, second: str, second_type: str) -> dict[str, Any]:
    """JSON Schema for "exactly one of the two fields holds a value" (the other absent or null), so the
    OpenAPI document states what the model validator enforces."""
    return {
        "oneOf": [
            {"required": [first], "properties": {first: {"type": first_type}, second: {"type": "null"}}},
            {"required": [second], "properties": {second: {"type": second_type}, first: {"type": "null"}}},
        ]
    }


class PredictJSON(PredictOptions):
    """``POST /predict`` as JSON: exactly one of ``image`` (base64 PNG/JPEG) or ``tensor``."""

    model_config = ConfigDict(json_schema_extra=_exactly_one("image", "string", "tensor", "array"))

    image: str | None = Field(None, description="base64 PNG or JPEG (a data: URL prefix is allowed)")
    tensor: list[Any] | None = Field(
        None,
        description="C x H x W (or 1 x C x H x W) floats, already normalised with the bundle's mean and std",
    )

    @model_validator(mode="after")
    def _one_input(self) -> PredictJSON:
        if (self.image is None) == (self.tensor is None):
            raise ValueError("send exactly one of 'image' (base64 PNG/JPEG) or 'tensor'")
        return self


class ExplainJSON(BaseModel):
    """``POST /explain`` as JSON: exactly one of ``image`` or ``tensor``; its options (``method``,
    ``top_k_maps``) are query parameters."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra=_exactly_one("image", "string", "tensor", "array")
    )

    image: str | None = Field(None, description="base64 PNG or JPEG (a data: URL prefix is allowed)")
    tensor: list[Any] | None = Field(
        None,
        description="C x H x W (or 1 x C x H x W) floats, already normalised with the bundle's mean and std",
    )


class BatchJSON(PredictOptions):
    """``POST /predict/batch`` as JSON: exactly one of ``images`` or ``tensors``."""

    model_config = ConfigDict(json_schema_extra=_exactly_one("images", "array", "tensors", "array"))

    images: list[str] | None = Field(None, description="base64 PNG or JPEG images")
    tensors: list[Any] | None = Field(None, description="C x H x W normalised tensors")

    @model_validator(mode="after")
    def _one_input(self) -> BatchJSON:
        if (self.images is None) == (self.tensors is None):
            raise ValueError("send exactly one of 'images' (base64 PNG/JPEG list) or 'tensors'")
        return self


class ClassProbability(BaseModel):
    label: int
    class_name: str
    probability: float


class OperatingPointRef(BaseModel):
    name: str
    threshold: float = Field(description="verdict 'unknown' where unified_score > threshold")


class ClassRef(BaseModel):
    label: int
    class_name: str


class FeatureMap(BaseModel):
    """One channel of the conductance layer."""

    channel: int = Field(description="channel index in the conductance layer")
    conductance: float = Field(description="its conductance for the class (the bundle's conductance)")
    png: str | None = Field(
        None,
        description="base64 PNG of the channel's activation for this image (heat colours, min-max scaled)",
    )


class TopFeatureMaps(BaseModel):
    predicted: list[FeatureMap] = Field(
        description="channels with the largest conductance for the prediction"
    )
    runner_up: list[FeatureMap] = Field(description="channels with the largest conductance for the runner-up")


class Explanation(BaseModel):
    """Why the CNN said what it said, for a reviewer (the paper's figures 1-2)."""

    method: ExplainMethod
    target: ClassRef = Field(description="the predicted class, whose logit is attributed")
    runner_up: ClassRef = Field(description="the class with the second largest logit")
    overlay_png: str = Field(
        description="base64 PNG: the input as sent (de-normalised) beside the input with the attribution map "
        "as a heat colour overlay, scaled up to at least 112 pixels a side"
    )
    top_feature_maps: TopFeatureMaps
    convergence_delta: float | None = Field(
        None,
        description="integrated gradients only: sum of attributions minus (F(x) - F(baseline)), the "
        "integration error; null for the other methods",
    )
    timings_ms: dict[str, float] = Field(description="conductance, attribution, render (of the whole batch)")


class CascadeOpinion(BaseModel):
    """What the cascade bundle said about an image the primary gate answered ``unknown``."""

    label: int = Field(description="the cascade CNN's predicted class index")
    class_name: str
    probabilities: list[float] = Field(
        description="the cascade CNN's softmax over all classes, in label order"
    )
    conductance_score: float | None = Field(
        description="its conductance detector's P(wrong); null when not computed"
    )
    lcr: float | None = Field(description="its label change rate; null when not computed")
    unified_score: float = Field(description="its signal set's P(wrong), compared with its threshold")
    verdict: Literal["accept", "unknown"] = Field(description="the cascade gate's own verdict")
    signal_set: str
    operating_point: OperatingPointRef
    bundle_id: str = Field(description="the cascade bundle")
    timings_ms: dict[str, float] = Field(description="queue and gate stages of the cascade run")
    batch_size: int = Field(description="images in the cascade gate run that answered this one")


DecidedBy = Literal["primary", "cascade", "none"]


class Prediction(BaseModel):
    """The answer for one image: the primary gate's evidence, and the verdict of whoever decided.

    Without a cascade every field is the primary gate's. With one (``cascade_bundle``), an image the
    primary rejects is run through the cascade gate: ``label``, ``class_name``, ``top_k`` and ``verdict``
    are then the cascade's when it accepts (``decided_by="cascade"``), the evidence fields
    (``probabilities``, scores, ``signal_set``, ``operating_point``, ``bundle_id``) stay the primary's, and
    ``cascade`` holds the cascade's own opinion, so both models' views are visible.
    """

    label: int = Field(description="the answer's class index: the primary's, or the cascade's if it decided")
    class_name: str
    top_k: list[ClassProbability] = Field(description="top classes of the model that gave the label")
    probabilities: list[float] = Field(
        description="the primary CNN's softmax over all classes, in label order"
    )
    primary_label: int = Field(
        description="the primary CNN's predicted class (differs from label only if "
        "the cascade decided with another class)"
    )
    decided_by: DecidedBy = Field(
        description="who made the verdict: primary (its gate accepted), cascade (the primary rejected, the "
        "cascade bundle accepted), none (unknown: rejected by every gate that ran; sent to the fallback)"
    )
    cascade: CascadeOpinion | None = Field(
        None,
        description="the cascade bundle's opinion, where the primary rejected and a cascade is configured",
    )
    conductance_score: float | None = Field(
        description="conductance detector's P(wrong); null when not computed"
    )
    lcr: float | None = Field(description="label change rate over the mutants; null when not computed")
    mutants_used: int | None = Field(
        None, description="mutants this image needed where the bundle stops LCR early; null otherwise"
    )
    unified_score: float = Field(description="the primary signal set's P(wrong), compared with its threshold")
    verdict: Literal["accept", "unknown"] = Field(
        description="accept = use label; unknown = no gate accepted "
        "(the primary's, then the cascade's if any)"
    )
    signal_set: str = Field(description="the primary's signal set")
    operating_point: OperatingPointRef
    bundle_id: str = Field(description="the primary bundle")
    timings_ms: dict[str, float] = Field(
        description="queue, forward or forward+conductance, lcr, detectors "
        "(gate stages: the whole batch), total"
    )
    batch_size: int = Field(description="images in the gate run that answered this one")
    request_id: str = Field(
        description="the request this answers: its X-Request-ID (the client's plain token, else a fresh id)"
    )
    conductance: list[float] | None = Field(
        None, description="conductance per channel (full_evidence / return_conductance)"
    )
    fallback_item: str | None = Field(
        None,
        description="key of the fallback item stored for this `unknown` image (also its Idempotency-Key at "
        "the fallback URL); None when the verdict is accept or no fallback is configured",
    )
    explanation: Explanation | None = Field(
        None, description="with explain=unknown (for an unknown verdict) or explain=all; null otherwise"
    )


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


REQUEST_ERRORS: dict[int, str] = {
    400: "X-Request-Timeout is not a positive number of seconds",
    401: "missing or wrong bearer token (when the server has an API key)",
    408: "the body did not arrive within the body timeout",
    415: "unsupported content type",
    429: "the API key's rate limit (rate_limit_per_s, burst rate_limit_burst) is spent (see Retry-After)",
}
"""Errors every route that reads an image body can answer (middleware, auth, rate limit, body reading)."""


def error_responses(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """A route's documented error statuses (FastAPI ``responses=``), each with the one error body."""
    return {code: {"model": ErrorResponse, "description": text} for code, text in descriptions.items()}


class Health(BaseModel):
    status: Literal["alive", "stuck"] = "alive"
    detail: str | None = None


class Readiness(BaseModel):
    ready: bool
    bundle_id: str | None = None
    detail: str


class SignalSetSummary(BaseModel):
    name: str
    signals: list[str]
    is_default: bool
    serving: bool = Field(description="the set this server uses when a request names none")
    default_point: str
    operating_points: dict[str, dict[str, Any]] = Field(description="threshold and val figures per point")
    details: dict[str, Any] = Field(description="other figures the build recorded (kind, val_auroc, ...)")


class CascadeSummary(BaseModel):
    """The second bundle deciding the primary's ``unknown`` images (``cascade_bundle``)."""

    bundle_id: str
    architecture: dict[str, Any]
    signal_set: str = Field(description="the cascade signal set that makes its verdict")
    operating_point: OperatingPointRef
    device: str


class BundleSummary(BaseModel):
    """What ``GET /v1/bundle`` shows: the manifest's summary, the signal sets and the serving choice."""

    bundle_id: str
    dataset: dict[str, Any]
    class_names: list[str]
    input_shape: list[int]
    architecture: dict[str, Any]
    conductance: dict[str, Any] | None
    training: dict[str, Any] | None
    mutants: dict[str, Any] | None
    default_set: str
    serving: dict[str, Any] = Field(description="signal set, operating point, device and input policy in use")
    signal_sets: list[SignalSetSummary]
    evidence_value: list[dict[str, Any]] | None = Field(
        None,
        description="evidence-value table of the build report (per signal set: AUROC, diff to MSP, cost)",
    )
    cascade: CascadeSummary | None = Field(
        None, description="the cascade bundle deciding the primary's unknowns; null when none is configured"
    )
