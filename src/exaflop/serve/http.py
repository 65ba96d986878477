"""HTTP/1.1 connection limits the ASGI app cannot enforce: header size and count, and the
time a client may take to send its request head.

uvicorn's httptools protocol (the fast one, used with `uvicorn[standard]`) has no header
limit and no read timeout: a 64 MiB header was buffered and parsed before the guard
could refuse it, and a client trickling one header byte a second held its connection
forever. uvicorn's h11 protocol has a size option (`h11_max_incomplete_event_size`) but
answers it with a 400 and costs ~5% throughput. So this subclasses uvicorn's own
httptools protocol: llhttp still does all the parsing; the subclass only counts the
bytes and headers it is fed before the head completes, and times the head:

- more than `max_header_bytes` of request line + headers, or more than `max_headers`
  headers: 431, in the OpenAI error shape, and the connection closes;
- a head not complete within `header_timeout` seconds of the connection opening (or of
  the previous response ending): 408 and close.

The body's deadline is the guard's (serve/app.py): it reads the body before the app.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from exaflop.serve.protocol import error_body


@dataclass(frozen=True)
class HTTPLimits:
    max_header_bytes: int = 64 << 10
    max_headers: int = 100
    header_timeout: float = 10.0  # seconds to send the request line and headers
    body_timeout: float = 30.0  # seconds to send the whole body (enforced by the guard)


def raw_error(status: int, reason: str, message: str, code: str) -> bytes:
    """A complete HTTP response in the OpenAI error shape that closes the connection."""
    body = json.dumps(error_body(message, "invalid_request_error", None, code)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("latin-1") + body


def limited_protocol(limits: HTTPLimits, on_refuse=None) -> type:
    """uvicorn's httptools protocol with `limits`; `on_refuse(reason)` counts refusals."""

    class LimitedHttpTools(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_bytes, self._n_headers, self._refused = 0, 0, ""
            self._in_head = True
            self._head_timer = self.loop.call_later(limits.header_timeout, self._head_timed_out)

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def _cancel_head_timer(self) -> None:
            if getattr(self, "_head_timer", None) is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _refuse(self, status: int, reason: str, message: str, code: str) -> None:
            self._refused = code
            self._cancel_head_timer()
            if on_refuse is not None:
                on_refuse(code)
            if not self.transport.is_closing():
                self.transport.write(raw_error(status, reason, message, code))
                self.transport.close()

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self._in_head and not self._refused:
                self._refuse(408, "Request Timeout", f"the request line and headers took longer than "
                             f"{limits.header_timeout:g} s to arrive", "request_timeout")

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._in_head:
                self._head_bytes += len(data)
                if self._head_timer is None:  # the first bytes of a keep-alive connection's next request
                    self._head_timer = self.loop.call_later(limits.header_timeout, self._head_timed_out)
            super().data_received(data)
            # Counted after feeding: a chunk that ends the head may also carry body bytes.
            if not self._refused and self._in_head and self._head_bytes > limits.max_header_bytes:
                self._too_large(f"request headers are larger than {limits.max_header_bytes} bytes")

        def _too_large(self, message: str) -> None:
            self._refuse(431, "Request Header Fields Too Large", message, "request_header_fields_too_large")

        def on_message_begin(self) -> None:
            self._in_head, self._n_headers = True, 0
            super().on_message_begin()

        def on_header(self, name: bytes, value: bytes) -> None:
            self._n_headers += 1
            if self._n_headers > limits.max_headers and not self._refused:
                self._too_large(f"more than {limits.max_headers} request headers")
                return
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            if self._refused:
                return
            self._in_head = False
            self._cancel_head_timer()
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._refused:
                super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._in_head, self._head_bytes = True, 0  # the next request's head starts the timer

    return LimitedHttpTools
