"""Request and response bodies of the review API (they are its part of the OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, model_validator


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a class index is an integer, not true or false")  # noqa: TRY004 (pydantic reports only ValueError)
    return value


ClassIndex = Annotated[int, BeforeValidator(_not_a_bool)]


class ReviewLabel(BaseModel):
    """What a person says an input is: one class of the bundle, or none of them."""

    # the document states what the validator enforces: a label and no "none", or "none" and no label
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                {
                    "required": ["label"],
                    "properties": {
                        "label": {"type": "integer", "minimum": 0},
                        "none_of_these": {"const": False},
                    },
                },
                {
                    "required": ["none_of_these"],
                    "properties": {"none_of_these": {"const": True}, "label": {"type": "null"}},
                },
            ]
        },
    )

    # a JSON true is not class 1 (9.0 is class 9, as JSON Schema's integer says), nor "true" a yes
    label: ClassIndex | None = Field(None, ge=0, description="the true class index")
    none_of_these: StrictBool = Field(False, description="the input belongs to none of the bundle's classes")
    reviewer: str | None = Field(
        None,
        min_length=1,
        max_length=100,
        description="who reviewed (default: the HTTP Basic user name, if any)",
    )

    @model_validator(mode="after")
    def _one_answer(self) -> ReviewLabel:
        if (self.label is not None) != self.none_of_these:
            return self
        raise ValueError("send exactly one of 'label' (a class index) or 'none_of_these': true")


class ReviewedLabel(BaseModel):
    label: int | None = Field(description="class index, or null for none of these classes")
    class_name: str = Field(description="the class's name, or 'none of these'")
    reviewer: str | None
    reviewed_at: float


class ReviewItem(BaseModel):
    """One rejected input as stored in the outbox, with its review once it has one."""

    key: str = Field(description="the outbox item's key (the fallback's Idempotency-Key)")
    created_at: float
    delivery_state: str = Field(description="pending, delivered or dead (delivery to the fallback URL)")
    request_id: str | None
    bundle_id: str | None
    image_url: str = Field(description="the input as received, as an image")
    prediction: dict[str, Any] = Field(description="the answer the client got (label, top classes, evidence)")
    explanation: dict[str, Any] | None = Field(
        None, description="the explanation stored with the item, if any"
    )
    review: ReviewedLabel | None = None


class RejectionEstimate(BaseModel):
    """The live check of the gate: of the rejections people reviewed, how many the CNN had wrong."""

    reviewed: int
    wrong: int = Field(
        description="reviewed rejections whose answer was not the true class (or no class fits)"
    )
    none_of_these: int
    wrong_rate: float | None = Field(description="wrong / reviewed (null before the first review)")
    wrong_rate_low: float = Field(description="exact (Clopper-Pearson) 95% interval, lower end")
    wrong_rate_high: float = Field(description="... upper end")


class ReviewQueue(BaseModel):
    waiting: int = Field(description="items nobody has reviewed yet")
    reviewed: int
    none_of_these: int = Field(description="reviewed items that belong to no class of the bundle")
    class_names: list[str]
    estimate: RejectionEstimate
    items: list[ReviewItem] = Field(description="waiting items, oldest first")
