"""What the router tells the rest of the server about each request: four hooks, one object.

The router calls ``admit`` before it touches a worker (raising refuses the request), ``tokens``
for every batch of tokens it hands to the client, ``finished`` when the request finished, and
``failed`` when the request's coroutine ends, however it ends (a no-op after ``finished``), with the
exception that ended it (None when there was none).
``RequestObserver`` is the no-op default (a bare router, unit tests); ``ServerObserver`` feeds
admission control and the Prometheus metrics, so both front ends (gRPC, HTTP) that drive the
router share them.
"""

from __future__ import annotations

from .admission import Admission
from .calls import GenerateCall, GenerateResult
from .metrics import ServerMetrics


class RequestObserver:
    def admit(self, request_id: str, call: GenerateCall) -> None:
        pass

    def tokens(self, request_id: str, num_new: int) -> None:
        pass

    def finished(self, request_id: str, result: GenerateResult, num_transferred_tokens: int | None) -> None:
        """``num_transferred_tokens``: prefix tokens whose K/V crossed a link (None: no transfer)."""

    def failed(self, request_id: str, exc: BaseException | None) -> None:
        pass


class ServerObserver(RequestObserver):
    def __init__(self, admission: Admission, metrics: ServerMetrics):
        self.admission, self.metrics = admission, metrics

    def admit(self, request_id: str, call: GenerateCall) -> None:
        try:
            self.admission.admit(request_id, call)
        except Exception as exc:
            self.metrics.failed(None, exc)
            raise
        self.metrics.admitted(request_id, len(call.prompt_token_ids))

    def tokens(self, request_id: str, num_new: int) -> None:
        self.admission.started(request_id)
        self.metrics.tokens(request_id, num_new)

    def finished(self, request_id: str, result: GenerateResult, num_transferred_tokens: int | None) -> None:
        self.admission.done(request_id)
        is_transferred = num_transferred_tokens is not None
        self.metrics.finished(
            request_id,
            result.finish_reason,
            result.timings.transfer_s if is_transferred else None,
            num_transferred_tokens,
        )

    def failed(self, request_id: str, exc: BaseException | None) -> None:
        self.admission.done(request_id)
        self.metrics.failed(request_id, exc if exc is not None else RuntimeError("ended without a reason"))
