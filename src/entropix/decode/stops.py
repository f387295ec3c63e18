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
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self.held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        """The held text, released because the row ended without a stop string."""
        out, self.held = self.held, ""
        return out
