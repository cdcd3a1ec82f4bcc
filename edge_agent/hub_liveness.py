"""Whether the hub answers, as the agent sees it: for the health endpoint, and so that a hard
input does not wait its whole deadline for a hub that is known to be gone.

The hub is taken as unreachable after MISSES_TO_DOWN offloads in a row went unanswered by their
deadline with nothing heard from it since (no answer, no ack). While it is, hard inputs are
answered from the edge at once (and still reach the hub later, as hard examples, when
`late_answers` is on); one offload every PROBE_EVERY_S still goes out, and the first answer or
ack brings the hub back.
"""

from __future__ import annotations

import threading
import time
from typing import Any

# Unanswered offloads in a row before the hub counts as unreachable: one lost offload is a
# fallback, not an outage (QoS 0 offloads can be lost at a reconnect).
MISSES_TO_DOWN = 3
# While unreachable, one offload this often finds out whether it is back.
PROBE_EVERY_S = 1.0


class HubLiveness:
    def __init__(self, misses_to_down: int = MISSES_TO_DOWN,
                 probe_every_s: float = PROBE_EVERY_S) -> None:
        self.misses_to_down = misses_to_down
        self.probe_every_s = probe_every_s
        self._lock = threading.Lock()
        self._heard_at: float | None = None
        self._misses = 0
        self._probe_at = 0.0

    def heard(self) -> None:
        """The hub answered an offload or acknowledged something."""
        with self._lock:
            self._heard_at = time.monotonic()
            self._misses = 0

    def missed(self) -> None:
        """An offload went unanswered by its deadline."""
        with self._lock:
            self._misses += 1

    @property
    def down(self) -> bool:
        return self._misses >= self.misses_to_down

    def may_offload(self) -> bool:
        """True unless the hub is unreachable and a probe went out less than PROBE_EVERY_S
        ago."""
        if not self.down:
            return True
        now = time.monotonic()
        with self._lock:
            if now - self._probe_at < self.probe_every_s:
                return False
            self._probe_at = now
            return True

    def state(self) -> dict[str, Any]:
        """For /healthz and telemetry: reachable, seconds since the hub was last heard (None:
        never), offloads unanswered in a row."""
        at = self._heard_at
        return {"reachable": not self.down,
                "last_heard_s": None if at is None else round(time.monotonic() - at, 3),
                "unanswered": self._misses}
