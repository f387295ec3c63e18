"""What every route reads: the model, the scheduler, the limits, the API key (on `app.state.entropix`)."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from ..sampler import catalog
from .errors import APIError
from .scheduler import Scheduler


@dataclass
class ServerContext:
    lm: Any  # a LoadedModel
    scheduler: Scheduler
    api_key: str | None
    max_n: int  # rows one request may ask for (n, branches, samples)
    max_body: int  # bytes
    default_max_tokens: int  # chat; completions keep OpenAI's 16
    max_context: int
    created: int = field(default_factory=lambda: int(time.time()))
    _thresholds: dict[str, float] | None = field(default=None, init=False, repr=False)

    @property
    def model_names(self) -> set[str]:
        """The served model's name, and the embedded model's aliases when it is that one."""
        from ..io.source import DEFAULT_ALIASES, DEFAULT_MODEL

        return {self.lm.name} | (set(DEFAULT_ALIASES) if self.lm.name == DEFAULT_MODEL else set())

    def thresholds(self) -> dict[str, float]:
        """The default entropix profile's thresholds for this model (the playground's lines)."""
        if self._thresholds is None:
            self._thresholds = catalog.default_thresholds(self.lm)
        return self._thresholds

    def key_given(self, request) -> bool:
        """Whether the request may see more than the status (no key set, or the right one sent)."""
        try:
            self.check_key(request)
        except APIError:
            return False
        return True

    def check_key(self, request) -> None:
        if not self.api_key:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if not auth:
            raise APIError(401, "You didn't provide an API key. Send it in the Authorization header "
                                "(Authorization: Bearer YOUR_KEY).", "invalid_request_error", None, "missing_api_key")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key")

    def check_model(self, name: str) -> None:
        if name not in self.model_names:
            raise APIError(404, f"The model `{name}` does not exist or you do not have access to it.",
                           "invalid_request_error", "model", "model_not_found")
