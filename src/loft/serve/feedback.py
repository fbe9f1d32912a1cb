"""Client feedback on served responses: ``POST /v1/feedback`` rates one response by its id.

The server remembers who got each of its last ``RESPONSE_WINDOW`` successful responses (the API
key's name, the resolved ``name:version`` and the split's arm) in a bounded map, so a rating can
be attributed to the version that produced it without trusting the client to say which. A rating
of an id the server never issued, or no longer remembers, is a 404; a rating from another key
than the one that got the response is a 403. Accepted ratings become audit-log lines
(``endpoint="/v1/feedback"``, ``about`` the rated request's id, ``score`` in [0, 1]), which is
where a rollout's live comparison reads them (``loft.serve.rollout``). A response may be rated
again; each rating is its own line.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from loft.core.errors import LoftError, NotFoundError, PermissionDeniedError, http_status_for
from loft.serve.audit import AuditLog
from loft.serve.metrics import Metrics
from loft.serve.protocol import InvalidRequestError, error_type_for, json_object

log = logging.getLogger("loft.serve")
ENDPOINT = "/v1/feedback"

RESPONSE_WINDOW = 100_000  # responses remembered for feedback (about 27 MB of memory)
MAX_COMMENT_CHARS = 2000
MAX_ID_CHARS = 128
THUMBS = {"up": 1.0, "down": 0.0}
# response ids are the request id with the object's prefix (see app._envelope)
_ID_PREFIXES = ("chatcmpl-", "cmpl-", "req-")


@dataclass(frozen=True)
class Served:
    """Who got one response and what produced it."""

    key: str  # the API key's name ("-" without auth)
    resolved: str  # name:version, or the base model's name
    route: str | None  # "champion" | "candidate" when a split applied
    owner: str = "-"  # the API key's id: a name freed by a revoked key may be taken again


@dataclass(frozen=True)
class Feedback:
    id: str  # as the client sent it (chatcmpl-..., cmpl-... or req-...)
    about: str  # the rated request's id, req-...
    score: float
    comment: str | None = None


class ResponseIndex:
    """The last ``capacity`` successful responses, by request id (oldest forgotten first)."""

    def __init__(self, capacity: int = RESPONSE_WINDOW) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Served] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def remember(self, request_id: str, served: Served) -> None:
        with self._lock:
            self._items[request_id] = served
            self._items.move_to_end(request_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def rated(self, fb: Feedback, key: str, owner: str) -> Served:
        """What ``fb`` rates, for the key named ``key`` (id ``owner``) sending it: NotFoundError
        (404) when the id is unknown or forgotten, PermissionDeniedError (403) when another key
        got that response."""
        with self._lock:
            served = self._items.get(fb.about)
        if served is None:
            raise NotFoundError(
                f"no response with id {fb.id!r} on this server; it rates only responses it "
                f"served, and remembers the last {self.capacity:,}.",
                hint="Send the 'id' of a response from this server (or its X-Request-Id), soon "
                "after receiving it.",
            )
        if served.owner != owner:
            raise PermissionDeniedError(
                f"API key {key!r} may not rate response {fb.id!r}: another key received it.",
                hint="Rate responses with the key that requested them.",
            )
        return served


@dataclass
class Rating:
    """One ``/v1/feedback`` request's bookkeeping: ``accept`` or ``refused`` writes its audit line
    (refused ones too, with their status and error type and no score)."""

    audit: AuditLog
    metrics: Metrics
    responses: ResponseIndex
    request_id: str
    key: str = "-"  # the caller's key name and id, once authenticated
    owner: str = "-"
    about: str | None = None
    t0: float = field(default_factory=time.perf_counter)

    def accept(self, raw: bytes) -> dict[str, Any]:
        """Parse, attribute and record the rating in ``raw``; the response body."""
        fb = parse_feedback(raw)
        self.about = fb.about
        served = self.responses.rated(fb, self.key, self.owner)
        self._write(200, None, served, fb.score, fb.comment)
        self.metrics.observe_feedback(served.resolved, fb.score)
        return {"object": "feedback", "id": fb.id, "score": fb.score}

    def refused(self, err: LoftError) -> None:
        status = http_status_for(err)
        self._write(status, error_type_for(status), None, None, None)

    def _write(
        self, status: int, error: str | None, served: Served | None, score: float | None,
        comment: str | None,
    ) -> None:  # fmt: skip
        try:
            self.audit.write(
                request_id=self.request_id, key=self.key, endpoint=ENDPOINT, about=self.about,
                resolved=served.resolved if served else None,
                route=served.route if served else None, score=score, comment=comment,
                status=status, error=error,
                latency_ms=round((time.perf_counter() - self.t0) * 1000, 1),
            )  # fmt: skip
        except OSError:
            log.exception("could not write the audit log")


def parse_feedback(raw: bytes) -> Feedback:
    """A ``/v1/feedback`` body: ``{"id", "score": 0..1}`` or ``{"id", "thumbs": "up"|"down"}``,
    optional ``"comment"``; InvalidRequestError (400) names the offending field."""
    doc = json_object(raw)
    rid = doc.get("id")
    if not isinstance(rid, str) or not rid.strip() or len(rid) > MAX_ID_CHARS:
        raise InvalidRequestError(
            f"'id' must be the id of a response from this server, got {_short(rid)}",
            param="id",
            hint='For example {"id": "chatcmpl-...", "thumbs": "up"}.',
        )
    score = _score(doc)
    comment = doc.get("comment")
    if comment is not None and not isinstance(comment, str):
        raise InvalidRequestError(
            f"'comment' must be a string, got {_short(comment)}", param="comment"
        )
    if comment is not None and len(comment) > MAX_COMMENT_CHARS:
        raise InvalidRequestError(
            f"'comment' is {len(comment)} characters, over the limit of {MAX_COMMENT_CHARS}.",
            param="comment",
            hint="Shorten it.",
        )
    rid = rid.strip()
    return Feedback(id=rid, about=request_id_of(rid), score=score, comment=comment)


def _score(doc: dict[str, Any]) -> float:
    has_score, has_thumbs = doc.get("score") is not None, doc.get("thumbs") is not None
    if has_score and has_thumbs:
        raise InvalidRequestError("give either 'score' or 'thumbs', not both.", param="thumbs")
    if has_thumbs:
        thumbs = doc["thumbs"]
        if not isinstance(thumbs, str) or thumbs not in THUMBS:  # {} / [] are unhashable
            raise InvalidRequestError(
                f'\'thumbs\' must be "up" or "down", got {_short(thumbs)}', param="thumbs"
            )
        return THUMBS[thumbs]
    if not has_score:
        raise InvalidRequestError(
            "'score' (a number in [0, 1]) or 'thumbs' (\"up\" or \"down\") is required",
            param="score",
        )
    score = doc["score"]
    if (
        isinstance(score, bool)
        or not isinstance(score, int | float)
        or not math.isfinite(score)
        or not 0.0 <= score <= 1.0
    ):
        raise InvalidRequestError(
            f"'score' must be a number in [0, 1], got {_short(score)}",
            param="score",
            hint="Scale your rating to [0, 1], or send thumbs up/down.",
        )
    return float(score)


def request_id_of(response_id: str) -> str:
    """``chatcmpl-X`` / ``cmpl-X`` / ``req-X`` -> ``req-X`` (any other id is kept, and unknown)."""
    for prefix in _ID_PREFIXES:
        if response_id.startswith(prefix):
            return "req-" + response_id[len(prefix) :]
    return response_id


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
