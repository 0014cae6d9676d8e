"""The API's request and response models (pydantic), and `ApiError`: what /docs and /openapi.json describe
and what requests are validated against (serving/server.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

from serving.text import LANGS

if TYPE_CHECKING:
    from serving.settings import ServerSettings


class ApiError(Exception):
    """A request the server refuses: answered as {"error": {"kind", "message"}} with `status`."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


class ErrorDetail(BaseModel):
    kind: str = Field(description="machine-readable error kind, e.g. invalid_json, text_too_long, overloaded")
    message: str = Field(description="what was wrong, naming the offending field or limit")


class ErrorResponse(BaseModel):
    error: ErrorDetail


_SCOPE_PATTERN = "^(global|lang:(" + "|".join(LANGS) + "))$"


class Span(BaseModel):
    start: int = Field(ge=0, description="offset of the span in the text as sent (Python str index: Unicode "
                                         "code points, not UTF-16 units)")
    end: int = Field(ge=0, description="offset just past the span")
    text: str = Field(description="text[start:end] of the text as sent")
    effect: float = Field(ge=-1.0, le=1.0, description="> 0: the span raised the spam probability. decomposition: "
                                                       "p(spam) - sigmoid(logit - the span's tokens' share of it); "
                                                       "occlusion: p(spam | text) - p(spam | text without the span)")


class Explanation(BaseModel):
    spans: list[Span] = Field(description="up to 5 spans that raised and 5 that lowered p(spam) most, by |effect| "
                                          "descending (words / 2-character CJK chunks)")
    method: Literal["decomposition", "occlusion"] = Field(
        description="decomposition: the mean-pooled logit split over the tokens of the same pass (bundles with "
                    "token_scores); occlusion: each span removed in turn (at most --explain-max-rows per text)")


class Result(BaseModel):
    label: Literal["spam", "ham"]
    spam_probability: float = Field(ge=0.0, le=1.0, description="softmax(logits)[1]")
    threshold: float = Field(description="the threshold that applied to this text (its language's own, or "
                                         "the global one): label is spam iff spam_probability >= threshold")
    threshold_scope: str = Field(pattern=_SCOPE_PATTERN, examples=["lang:ko", "global"],
                                 description='"lang:<tag>" when the text\'s language has a threshold of its '
                                             'own (chosen on that language\'s validation rows), else "global"')
    lang: Literal[LANGS] = Field(description="script-based tag of the normalised text")  # type: ignore[valid-type]
    truncated: bool = Field(description="the text was longer than the model reads (tokens or --max-chars)")
    explanation: Explanation | None = Field(default=None, description='only with "explain": true')


class ModelInfo(BaseModel):
    bundle: str = Field(description="bundle directory name")
    variant: Literal["fp32", "int8"]
    sha256: str = Field(description="first 16 hex digits of the served ONNX file's checksum")
    threshold: float = Field(description="the global threshold: for texts whose language has none of its own")
    threshold_by_lang: dict[Literal[LANGS], float] = Field(  # type: ignore[valid-type]
        default_factory=dict, description="per-language thresholds, by language tag (scope lang:<tag>)")
    created_at: str | None = None
    mlflow_run_id: str | None = None


class ClassifyResponse(BaseModel):
    results: list[Result] = Field(description="one result per input text, in the same order")
    model: ModelInfo


class Health(BaseModel):
    status: Literal["ok"]


class FeedbackAck(BaseModel):
    id: int = Field(description="the report's id in the feedback store")
    duplicate: bool = Field(description="true when this report (same normalised text, label and reporter) was "
                                        "already stored: id is then the first report's id (status 200, not 201)")


class Disagreement(BaseModel):
    total: int
    reported_spam_model_ham: int = Field(description="label spam, probability below the threshold that applied")
    reported_ham_model_spam: int = Field(description="label ham, probability at or above the threshold")


class FeedbackStats(BaseModel):
    total: int
    by_label: dict[str, int]
    by_lang: dict[str, int]
    by_day: dict[str, int] = Field(description="reports per UTC day (YYYY-MM-DD)")
    by_bundle: dict[str, int] = Field(description="reports per served model (first 16 hex digits of its sha256)")
    reporters: int = Field(description="distinct reporters (reports without one count as one)")
    disagree: Disagreement = Field(description="reports whose label is not the model's verdict at report time")
    first: str | None = None
    last: str | None = None


class Readiness(BaseModel):
    status: Literal["ready", "starting"]
    model: ModelInfo | None = None


def classify_request(settings: ServerSettings) -> type[BaseModel]:
    # The schema states the live limits, so clients and schemathesis see what the server enforces.
    if settings.too_long == "reject":
        text_type: Any = Annotated[str, StringConstraints(max_length=settings.max_chars)]
    else:
        text_type = str
    example = {"texts": ["WINNER!! Claim your prize: reply YES", "恭喜您中奖了，请点击链接领取", "会議は3時からです"]}
    return create_model(
        "ClassifyRequest",
        __config__=ConfigDict(json_schema_extra={"examples": [example]}),
        texts=(list[text_type], Field(min_length=1, max_length=settings.max_texts,
                                      description="messages to classify (raw text; normalised by the server)")),
        explain=(bool, Field(default=False, description="add each result's `explanation` (at most "
                                                        f"{settings.explain_max_texts} texts; more: 413)")),
    )


def feedback_request(settings: ServerSettings) -> type[BaseModel]:
    from serving.feedback import MAX_REPORTER_CHARS

    text = Annotated[str, StringConstraints(min_length=1, max_length=settings.max_chars, pattern=r"\S")]
    example = {"text": "恭喜您中奖了，请点击链接领取", "label": "spam", "reporter": "user-42", "note": "phishing"}
    return create_model(
        "FeedbackRequest",
        __config__=ConfigDict(json_schema_extra={"examples": [example]}),
        text=(text, Field(description="the message as the user received it (at most --max-chars characters; "
                                      "not only whitespace)")),
        label=(Literal["spam", "ham"], Field(description="what the reporter says the message is")),
        reporter=(Annotated[str, StringConstraints(max_length=MAX_REPORTER_CHARS)] | None,
                  Field(default=None, description="who reports (one report per text, label and reporter)")),
        note=(Annotated[str, StringConstraints(max_length=settings.max_chars)] | None,
              Field(default=None, description="free text, stored with the report")),
    )


def error_responses(*codes: int, feedback: bool = False) -> dict[int | str, dict[str, Any]]:
    text = {400: "invalid_json, invalid_utf8, invalid_unicode (an unpaired surrogate escape)",
            401: "unauthorized: missing or wrong `Authorization: Bearer <key>`",
            408: "request_timeout: the body did not arrive within --read-timeout seconds",
            413: "body_too_large (--max-body-bytes), too_many_texts (--max-texts; --explain-max-texts with "
                 '"explain": true), text_too_long (--max-chars)',
            422: "invalid_request (wrong shape or types), empty_texts",
            500: "inference_error", 503: "overloaded: the queue is full; retry after Retry-After seconds"}
    if feedback:
        text |= {413: "body_too_large (--max-body-bytes), text_too_long (text or note over --max-chars, reporter "
                      "over 256 characters)",
                 422: "invalid_request (wrong shape, types or label), empty_text",
                 500: "inference_error, internal",
                 503: "overloaded (retry after Retry-After seconds), feedback_disabled (--feedback-db none), "
                      "store_unavailable (the database refused the write)"}
    out: dict[int | str, dict[str, Any]] = {c: {"model": ErrorResponse, "description": text[c]} for c in codes}
    if 503 in out:
        out[503]["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}
    if 401 in out:
        out[401]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return out
