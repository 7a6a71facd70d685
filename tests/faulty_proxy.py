"""A small HTTP proxy on 127.0.0.1 that injects storage faults in front of the moto S3 server.

The store's retries and checksums are only as good as the faults they have met, so the tests put
this between s3fs and moto and choose at run time which requests go wrong and how:

    drop      close the connection without answering (the request never reaches moto)
    truncate  relay the answer but cut its body in half and close the connection
    500, 503  answer an S3 XML error (InternalError, SlowDown) instead of relaying
    flip      relay the answer with one byte of its body inverted (a GET body corrupted in transit)
    stall     relay the answer after STALL_SECONDS (a store that has stopped answering, for a while)

It counts every request and every fault it injected, so a test can assert the faults happened.
stdlib only: one thread per client connection (HTTP/1.1 keep-alive, as aiohttp pools them), one
upstream connection per request. Request bodies need a Content-Length, as botocore's S3 requests have.
"""

from __future__ import annotations

import http.client
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("drop", "truncate", "500", "503", "flip", "stall")
STALL_SECONDS = 3.0

_S3_ERRORS = {
    "500": ("InternalError", "We encountered an internal error. Please try again."),
    "503": ("SlowDown", "Please reduce your request rate."),
}
# Hop-by-hop or framing headers the proxy sets itself (the body is relayed whole, with its length).
_NOT_RELAYED = {"connection", "keep-alive", "transfer-encoding", "expect", "content-length"}


@dataclass
class Plan:
    """Which requests fail: every `every`-th request matching method, path and header, at most
    `times` of them."""

    fault: str
    every: int = 1
    times: int | None = None
    method: str | None = None
    path_contains: str = ""
    header: str | None = None
    matched: int = 0
    injected: int = 0

    def pick(self, method: str, path: str, headers) -> str | None:
        """The fault for this request, or None to relay it untouched."""
        if (self.method and method != self.method) or self.path_contains not in path \
                or (self.header and self.header not in headers):
            return None
        if self.times is not None and self.injected >= self.times:
            return None
        self.matched += 1
        if self.matched % self.every:
            return None
        self.injected += 1
        return self.fault


class FaultyProxy:
    """Relay HTTP to `upstream` (e.g. http://127.0.0.1:PORT) and inject the planned faults."""

    def __init__(self, upstream: str):
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.requests = 0
        self.faults: Counter[str] = Counter()
        self._plan: Plan | None = None
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _handler_for(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-proxy", daemon=True)

    def start(self) -> "FaultyProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def inject(self, fault: str, *, every: int = 1, times: int | None = None, method: str | None = None,
               path_contains: str = "", header: str | None = None) -> None:
        """Fail every `every`-th matching request with `fault`, at most `times` times (None: no limit).

        A request matches when its method is `method`, its path contains `path_contains` and it
        carries the header `header` (e.g. "Range": only ranged GETs); None matches any.
        """
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r} (known: {', '.join(FAULTS)})")
        with self._lock:
            self._plan = Plan(fault, every, times, method, path_contains, header)

    def heal(self) -> None:
        """Relay everything untouched from now on (the counters are kept)."""
        with self._lock:
            self._plan = None

    def _next_fault(self, method: str, path: str, headers) -> str | None:
        with self._lock:
            self.requests += 1
            fault = self._plan.pick(method, path, headers) if self._plan else None
            if fault:
                self.faults[fault] += 1
            return fault

    def _not_injected(self, fault: str) -> None:
        """Uncount a fault that found nothing to act on (a flip of an empty body)."""
        with self._lock:
            self.faults[fault] -= 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """A client hanging up mid-answer is routine here (s3fs closes a body it does not need)."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler_for(proxy: FaultyProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a drop hits a pooled connection, as in real life

        def log_message(self, *args) -> None:  # quiet: pytest shows failures, not access logs
            pass

        def relay(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            fault = proxy._next_fault(self.command, self.path, self.headers)
            if fault == "drop":
                self.close_connection = True
                return
            if fault in _S3_ERRORS:
                code, message = _S3_ERRORS[fault]
                self.answer(int(fault), {"Content-Type": "application/xml"},
                            f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                            f"<Message>{message}</Message></Error>".encode())
                return
            if fault == "stall":
                time.sleep(STALL_SECONDS)
            status, headers, answer = self.forward(body)
            if fault == "truncate" and answer:
                self.answer(status, headers, answer, cut_at=len(answer) // 2)
            elif fault == "truncate":  # nothing to cut short: the next worst thing is no answer
                self.close_connection = True
            elif fault == "flip" and answer:
                middle = len(answer) // 2
                self.answer(status, headers, answer[:middle] + bytes([answer[middle] ^ 0xFF]) + answer[middle + 1:])
            else:
                if fault == "flip":
                    proxy._not_injected(fault)
                self.answer(status, headers, answer)

        def forward(self, body: bytes) -> tuple[int, dict, bytes]:
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=30)
            try:
                upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():  # Host included: SigV4 signed it
                    if name.lower() not in _NOT_RELAYED:
                        upstream.putheader(name, value)
                upstream.putheader("Content-Length", str(len(body)))
                upstream.endheaders(body)
                response = upstream.getresponse()
                answer = response.read()
                headers = {k: v for k, v in response.getheaders() if k.lower() not in _NOT_RELAYED}
                if self.command == "HEAD":  # a HEAD answer announces the object's length, sends no body
                    headers["Content-Length"] = response.getheader("Content-Length", "0")
                return response.status, headers, answer
            finally:
                upstream.close()

        def answer(self, status: int, headers: dict, body: bytes, cut_at: int | None = None) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body if cut_at is None else body[:cut_at])
            self.wfile.flush()
            if cut_at is not None:
                self.close_connection = True

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = relay

    return Handler
