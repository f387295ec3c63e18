"""Stop strings, matched incrementally.

Text that could still turn into a stop string is held back until it cannot, so what a
consumer has been given is always a prefix of the final text, and each token costs time
in the length of the longest stop string, not of the text so far.
"""

from __future__ import annotations


class StopText:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""  # released text never includes these characters yet
        # For a last character c: the prefix lengths k (longest first) of each stop whose prefix
        # ends in c. Only those can be a held tail, so a token costs a few comparisons, not
        # one per prefix length (16 stop strings of 256 characters would be ~4,000).
        self._ends: dict[str, list[tuple[str, int]]] = {}
        for st in self.stops:
            for k in range(len(st) - 1, 0, -1):
                self._ends.setdefault(st[k - 1], []).append((st, k))
        for v in self._ends.values():
            v.sort(key=lambda e: -e[1])

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text to release now, whether a stop string was found). After a stop the
        released text ends just before it and the rest is dropped."""
        buf = self.held + delta
        # The stop that completes first wins, as if the text came one character at a time
        # (a tie: the longer one, which starts earlier): what is released never depends on
        # how the text was split into tokens.
        hits = [(p + len(s), p) for s, p in ((s, buf.find(s)) for s in self.stops) if p >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)[1]], True
        # Hold back the longest tail that is the start of some stop string: any stop that
        # completes later must begin inside it.
        hold = 0
        for s, k in self._ends.get(buf[-1:], ()):
            if k <= len(buf) and buf.endswith(s[:k]):
                hold = k  # longest first: the first match is the tail to hold
                break
        self.held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        """The held text, released because the row ended without a stop string."""
        out, self.held = self.held, ""
        return out
