"""Full garbage collections run by the base workers, between steps, not by allocation counts.

CPython starts a full (generation 2) collection whenever enough objects have survived the
young generations, in whichever thread allocates, and holds the GIL until it ends. In the
serve bench those collections took 13 to 231 ms each, and every row decoding meanwhile
waited that long for its next token. Once `defer_full_collections` has run, the automatic
collector keeps only its cheap young generations (3 ms at most there); each base worker
runs the full collection itself when it has nothing to decode, at most once a
`MIN_IDLE_INTERVAL_S`, and under constant load at least once a `MAX_INTERVAL_S`, so
cyclic garbage stays bounded.

Known shortcoming: with several bases, one worker's idle collection still stalls another
worker that is decoding.
"""

from __future__ import annotations

import gc
import threading
import time

#: An idle worker collects at most this often.
MIN_IDLE_INTERVAL_S = 1.0
#: A busy worker still collects this often, so garbage cannot grow without bound.
MAX_INTERVAL_S = 60.0
#: A generation-2 threshold no survivor count reaches.
_NEVER = 1 << 30

_lock = threading.Lock()
_state = {"deferred": False, "last": time.monotonic()}


def defer_full_collections() -> None:
    """Leave full collections to `collect_if_due` (young generations stay automatic)."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, _NEVER)
    with _lock:
        _state["deferred"] = True


def collect_if_due(idle: bool, now: float | None = None) -> bool:
    """Run a full collection when one is due; True when it ran."""
    now = time.monotonic() if now is None else now
    with _lock:
        if not _state["deferred"]:
            return False
        interval = MIN_IDLE_INTERVAL_S if idle else MAX_INTERVAL_S
        if now - float(_state["last"]) < interval:
            return False
        _state["last"] = now
    gc.collect()
    return True
