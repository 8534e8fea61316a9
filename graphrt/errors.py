"""The errors a caller of the engine handles. No heavy imports, so the server's API processes
and the mock engine can raise and catch them without loading torch."""


class RequestRejected(ValueError):
    """A request that can never be served as given; the message says why (HTTP 400).
    ``param`` names the request field at fault and ``code`` is OpenAI's error code, when known
    (``graphrt.validation``)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; the caller should retry later (HTTP 503)."""
