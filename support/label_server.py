"""
The labeling page's HTTP plumbing (label.py holds the ideas): a standard-library server that serves one page and a
two-call JSON API, and checks every call against the session's secret token.

    GET  /?token=T                      the page (label_page.html)
    GET  /api/state?worker=W            header X-Label-Token: T -> the worker's progress and next pair
    POST /api/judge                     header X-Label-Token: T, JSON body -> the state after the judgement

Why a token in a header: a page on another site can make the browser send a form or a "simple" request to
127.0.0.1, but it cannot read the token (served only to whoever has the address label.py printed) and it cannot set a
custom header without a CORS preflight, which this server never grants. So no other site can post a judgement.
"""
import hmac
import json
import secrets
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

PAGE = Path(__file__).with_name("label_page.html")
MAX_BODY = 64 * 1024  # a judgement is a few hundred bytes; notes are capped well below this
IDLE_TIMEOUT = 60.0  # seconds a connection may send nothing before it is closed: each one holds a thread


class RequestError(Exception):
    """A request the labeling app refuses: answered with this HTTP status and message, the file untouched."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def make_server(app, host="127.0.0.1", port=8765, token=None, quiet=False, idle_timeout=IDLE_TIMEOUT):
    """A ThreadingHTTPServer bound to host:port (port 0: any free one) for `app`, an object with
    `state(worker) -> dict` and `judge(body) -> dict` that raise RequestError for what they refuse. A connection
    that sends nothing for idle_timeout seconds is closed. Returns the server; its `.token` and `.url` say how to
    reach it."""
    token = token or secrets.token_urlsafe(18)
    # `timeout` is socketserver's per-connection socket timeout; http.server closes the connection when it expires
    handler = type("Handler", (_Handler,), dict(app=app, token=token, quiet=quiet, timeout=idle_timeout))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # --host ::1 is IPv6
    # socketserver's listen backlog is 5: a few people (browsers open several connections each) overflow it and are
    # reset; 128 is Linux's usual cap.
    server = type("Server", (ThreadingHTTPServer,), dict(address_family=family, request_queue_size=128))(
        (host, port), handler)
    server.daemon_threads = True
    server.token = token
    name = f"[{host}]" if ":" in host else host
    server.url = f"http://{name}:{server.server_address[1]}/?token={token}"
    return server


def serve_in_thread(server):
    """Run `server` on a daemon thread (tests, notebooks); stop it with server.shutdown()."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


class _Handler(BaseHTTPRequestHandler):
    app, token, quiet = None, None, False
    server_version = "label.py"

    # -- routes ----------------------------------------------------------------------------------------------------
    def do_GET(self):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/":
            if not self._token_ok(query.get("token", [""])[0]):
                return self._send(403, "text/plain; charset=utf-8", b"403: this page needs the address label.py "
                                  b"printed, token included (a restarted server prints a new one)\n")
            return self._page()
        if url.path == "/api/state":
            return self._api(lambda: self.app.state(query.get("worker", [""])[0]))
        self._error(404, f"no such page: {url.path}")

    def do_POST(self):
        raw = self._read_body()  # first, whatever the answer: a reply that leaves a body unread can be reset
        if urlsplit(self.path).path != "/api/judge":
            return self._error(404, f"no such address: {urlsplit(self.path).path}")
        self._api(lambda: self.app.judge(self._json_body(raw)))

    def _method_not_allowed(self):
        self._error(405, f"{self.command} is not used here: GET the page and state, POST judgements")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _method_not_allowed

    # -- checks ----------------------------------------------------------------------------------------------------
    def _token_ok(self, given):
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _api(self, call):
        try:
            if not self._token_ok(self.headers.get("X-Label-Token", "")):
                raise RequestError(403, "missing or wrong X-Label-Token: open the address label.py printed (a "
                                   "restarted server prints a new one)")
            origin = self.headers.get("Origin")  # the page's own is http://<Host>: this server speaks no TLS
            if origin and origin.lower() != f"http://{self.headers.get('Host', '')}".lower():
                raise RequestError(403, f"cross-site request from {origin} refused")
            reply = call()
        except RequestError as e:
            return self._error(e.status, str(e))
        except Exception as e:  # a bug, not the client's fault: say so, keep serving the others
            print(f"label.py: error while answering {self.command} {self.path}: {type(e).__name__}: {e}",
                  file=sys.stderr)
            return self._error(500, f"server error: {type(e).__name__}: {e}")
        self._send(200, "application/json", json.dumps(reply).encode())

    def _read_body(self):
        """The request body as bytes (at most MAX_BODY), or a RequestError to answer with."""
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return RequestError(411, "Content-Length is missing or not a number")
        if length > MAX_BODY:
            self.close_connection = True
            if length <= 16 * MAX_BODY:
                self.rfile.read(length)
            return RequestError(413, f"a body of {length} bytes (a judgement is at most {MAX_BODY})")
        return self.rfile.read(length) if length > 0 else RequestError(400, f"Content-Length {length}: no body")

    def _json_body(self, raw):
        if isinstance(raw, RequestError):
            raise raw
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            raise RequestError(415, "send the judgement as Content-Type: application/json")
        try:
            body = json.loads(raw.decode("utf-8"))
        except RecursionError:  # arrays nested thousands deep: the body of no judgement
            raise RequestError(400, "the body is not JSON this server reads (nested too deep)") from None
        except ValueError as e:  # bad UTF-8 or JSON, or an integer of over 4300 digits (Python's limit)
            raise RequestError(400, f"the body is not JSON this server reads ({e})") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body should be a JSON object")
        return body

    # -- replies ---------------------------------------------------------------------------------------------------
    def _page(self):
        nonce = secrets.token_urlsafe(12)  # only the page's own script runs, whatever a post might smuggle in
        html = PAGE.read_text(encoding="utf-8").replace("{{NONCE}}", nonce)
        self._send(200, "text/html; charset=utf-8", html.encode(), csp=(
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"))

    def _error(self, status, message):
        self._send(status, "application/json", json.dumps(dict(error=message)).encode())

    def _send(self, status, content_type, body, csp=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")  # the token is in the page's address
        if csp:
            self.send_header("Content-Security-Policy", csp)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        if not self.quiet:
            sys.stderr.write(f"label.py: {self.address_string()} {fmt % args}\n")
