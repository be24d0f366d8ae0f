"""Errors the engine raises for a caller's mistake, carrying what a front end needs to report it."""

from __future__ import annotations


class InvalidParameterError(ValueError):
    """A request parameter is invalid; `param` names it (a SamplingParams field, or "prompt").

    A ValueError, so callers that catch ValueError keep working; an HTTP server maps `param` to the
    request field it came from (e.g. "prompt" -> the chat endpoint's "messages").
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
