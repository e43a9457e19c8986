"""What each session did: one span per job (kind, timing, outcome, tokens), and an audit trail.

Spans feed a session's trace export (Chrome trace-event JSON, which Perfetto opens) and the
hourly usage report (training, prompt and sampled tokens; checkpoint counts). The audit trail
records every state-changing call per tenant as one JSON line in the data directory, so it
survives restarts.

Known shortcoming: spans live in the server process (like sessions), so a restart forgets
traces and token usage; the audit trail and the catalog are durable.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mint.control.futures import JobFuture, Result

#: Spans kept in memory across all sessions; the oldest go first.
MAX_SPANS = 200_000


def session_of(subject_id: str) -> str:
    """The session inside a model id (`<session>:train:<n>`) or sampler id."""
    return subject_id.split(":", 1)[0]


@dataclass
class Span:
    tenant: str
    session_id: str
    kind: str
    request_id: str
    base_model: str
    started_at: float
    finished_at: float | None = None
    ok: bool | None = None
    train_tokens: int = 0
    prompt_tokens: int = 0
    sampled_tokens: int = 0


class ActivityLog:
    def __init__(self, audit_file: Path) -> None:
        self._spans: dict[str, Span] = {}  # by request id, oldest first
        self._lock = threading.Lock()
        self._audit_file = audit_file

    # -------------------------------------------------------------------------- spans
    def track(
        self,
        future: JobFuture,
        subject_id: str,
        base_model: str,
        train_tokens: int = 0,
        prompt_tokens: int = 0,
        count_sampled: Callable[[Result], int] | None = None,
    ) -> None:
        """Record a span for `future`, closed (with its outcome) when the job finishes."""
        span = Span(
            future.tenant, session_of(subject_id), future.kind, future.request_id, base_model,
            future.created_at, train_tokens=train_tokens, prompt_tokens=prompt_tokens,
        )  # fmt: skip
        with self._lock:
            if future.request_id in self._spans:  # a replayed request answers the same job
                return
            self._spans[future.request_id] = span
            while len(self._spans) > MAX_SPANS:
                del self._spans[next(iter(self._spans))]

        def close(inner: Any) -> None:
            span.finished_at = time.time()
            span.ok = inner.exception() is None
            if span.ok and count_sampled is not None:
                span.sampled_tokens = count_sampled(inner.result())

        future.inner.add_done_callback(close)

    def spans(self, tenant: str, session_id: str | None = None) -> list[Span]:
        with self._lock:
            return [
                s
                for s in self._spans.values()
                if s.tenant == tenant and (session_id is None or s.session_id == session_id)
            ]

    def chrome_trace(self, tenant: str, session_id: str) -> dict[str, Any]:
        """The session's jobs as complete ("X") trace events, one track per job kind."""
        events = []
        for span in self.spans(tenant, session_id):
            end = span.finished_at if span.finished_at is not None else time.time()
            events.append(
                {
                    "name": span.kind,
                    "ph": "X",
                    "ts": round(span.started_at * 1e6),
                    "dur": round((end - span.started_at) * 1e6),
                    "pid": session_id,
                    "tid": span.kind,
                    "args": {
                        "request_id": span.request_id,
                        "base_model": span.base_model,
                        "outcome": {None: "pending", True: "ok", False: "failed"}[span.ok],
                        "train_tokens": span.train_tokens,
                        "prompt_tokens": span.prompt_tokens,
                        "sampled_tokens": span.sampled_tokens,
                    },
                }
            )
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    # -------------------------------------------------------------------------- audit
    def audit(self, tenant: str, event: str, details: dict[str, object]) -> None:
        entry = {
            "tenant": tenant,
            "timestamp": datetime.now(UTC).isoformat(),
            "event": event,
            "event_details": details,
        }
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        with self._lock, self._audit_file.open("a") as handle:
            handle.write(line)

    def audit_entries(self, tenant: str, day: str | None = None) -> list[dict[str, Any]]:
        """The tenant's audit entries, oldest first, optionally of one UTC day (YYYY-MM-DD)."""
        if not self._audit_file.exists():
            return []
        entries = []
        with self._lock, self._audit_file.open() as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash mid-write
                    continue
                if entry.get("tenant") != tenant:
                    continue
                if day is not None and not str(entry.get("timestamp", "")).startswith(day):
                    continue
                entries.append(entry)
        return entries
