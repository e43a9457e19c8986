"""Client sessions, their training clients and their samplers (in memory).

Known shortcoming: sessions and sampler bindings live in the server process; a restart
forgets them (policies, revisions and training states are durable in the catalog).
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

from mint.errors import NotFound


@dataclass
class Session:
    session_id: str
    tenant: str
    tags: list[str]
    user_metadata: dict[str, object]
    created_at: float = field(default_factory=time.time)
    last_heartbeat: float = field(default_factory=time.time)
    finished: bool = False
    #: The reason the client gave when it finished (`success`, `errored`, `interrupted`),
    #: or "reaped" when its heartbeats stopped.
    finish_reason: str | None = None
    project_id: str | None = None
    display_name: str | None = None
    model_ids: list[str] = field(default_factory=list)
    sampler_ids: list[str] = field(default_factory=list)


@dataclass
class Sampler:
    """What a sampling session serves: a base alone, or a policy's revision by reference.

    `ref` is resolved at every request (a name, an alias or a revision number), so sampling
    through an alias follows the alias when it moves.
    """

    sampler_id: str
    tenant: str
    base_id: str
    policy_id: str | None = None
    ref: str | None = None
    model_path: str | None = None


class SessionTable:
    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._samplers: dict[str, Sampler] = {}
        self._lock = threading.Lock()

    def create(self, tenant: str, tags: list[str], user_metadata: dict[str, object]) -> Session:
        session = Session(f"sess-{secrets.token_hex(6)}", tenant, tags, user_metadata)
        with self._lock:
            self._sessions[session.session_id] = session
        return session

    def get(self, tenant: str, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None or session.tenant != tenant:
            raise NotFound(
                f"no session {session_id!r}; create one with create_session (the SDK does this "
                f"when a ServiceClient first needs it)"
            )
        return session

    def heartbeat(self, tenant: str, session_id: str) -> Session:
        session = self.get(tenant, session_id)
        session.last_heartbeat = time.time()
        return session

    def owned_by(self, tenant: str) -> list[Session]:
        with self._lock:
            return [s for s in self._sessions.values() if s.tenant == tenant]

    def idle(self, timeout_s: float, now: float | None = None) -> list[Session]:
        """Unfinished sessions whose last heartbeat is older than `timeout_s`."""
        horizon = (time.time() if now is None else now) - timeout_s
        with self._lock:
            return [
                s for s in self._sessions.values() if not s.finished and s.last_heartbeat < horizon
            ]

    def drop_samplers(self, session: Session) -> None:
        with self._lock:
            for sampler_id in session.sampler_ids:
                self._samplers.pop(sampler_id, None)

    def add_sampler(self, sampler: Sampler, session: Session | None) -> None:
        with self._lock:
            self._samplers[sampler.sampler_id] = sampler
            if session is not None:
                session.sampler_ids.append(sampler.sampler_id)

    def sampler(self, tenant: str, sampler_id: str) -> Sampler:
        with self._lock:
            sampler = self._samplers.get(sampler_id)
        if sampler is None or sampler.tenant != tenant:
            raise NotFound(
                f"no sampling session {sampler_id!r}; create one with create_sampling_client"
            )
        return sampler
