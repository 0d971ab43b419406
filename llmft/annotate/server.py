"""`llmft annotate serve`: one local web page where people judge candidate answers, and its small JSON API.

    GET  /                      the page (static HTML + JS, no outside resources)
    GET  /api/item?annotator=A[&index=N]   item N (default: A's first unfinished), its candidates in A's shown
                                order, A's judgements in force on it, progress
    POST /api/judge             {annotator, item, action, ...fields}: written to the annotations file, then answered

Bound to the loopback address by default. Any other address needs `--allow-remote` and a token that every request
carries (`?token=` on the page's address; the page sends it back as the X-Llmft-Token header); requests without it
get 403. On loopback, a Host header other than a loopback name is refused (no DNS rebinding), and judgements must be
posted as application/json (no cross-site form posts).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlparse

from llmft.annotate.items import Item, Items
from llmft.annotate.store import Store, shown_order
from llmft.errors import ConfigError, LlmftError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]", "::1")
MODES = ("feedback", "compare")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_binding(host: str, allow_remote: bool, token: str | None) -> str | None:
    """The token requests must carry: none on loopback (unless given), a given or fresh one elsewhere."""
    if is_loopback(host):
        return token
    if not allow_remote:
        raise ConfigError(f"--host {host} is reachable from other machines: add --allow-remote (every request then "
                          f"needs the token printed with the address)")
    return token or secrets.token_urlsafe(16)


class App:
    """What the handler needs: the items, the store, the mode, the token and a default annotator."""

    def __init__(self, items: Items, store: Store, mode: str, token: str | None, annotator: str | None,
                 loopback: bool):
        if mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got '{mode}'")
        if mode == "compare":
            for it in items.items:
                if len(it.candidates) != 2:
                    raise ConfigError(f"{it.where}: --mode compare shows two answers side by side; item '{it.id}' "
                                      f"has {len(it.candidates)}")
        self.items, self.store, self.mode, self.token = items, store, mode, token
        self.annotator, self.loopback = annotator, loopback

    def item_view(self, annotator: str, index: int | None) -> dict:
        finished = self.store.finished(annotator)
        if index is None:
            index = next((i for i, it in enumerate(self.items.items) if it.id not in finished), None)
        out = {"mode": self.mode, "total": len(self.items), "done": len(finished), "index": index,
               "annotator": annotator, "source": self.items.path}
        if index is None or not 0 <= index < len(self.items):
            return out | {"item": None}
        item = self.items.items[index]
        return out | {"item": self.describe(item, annotator), "finished": item.id in finished,
                      "judgements": [j.line for j in self.store.current(annotator) if j.item == item.id]}

    @staticmethod
    def describe(item: Item, annotator: str) -> dict:
        order = shown_order(annotator, item)
        return {"id": item.id, "prompt": item.prompt_text, "shown": order,
                "candidates": [{"index": i, "text": item.candidates[i].text} for i in order]}

    def judge(self, body: dict) -> dict:
        annotator, item_id, action = (str(body.get(k, "")) for k in ("annotator", "item", "action"))
        if self.mode == "compare" and action not in ("compare", "skip"):
            raise ConfigError(f"this page compares answers blind: '{action}' is not one of its judgements")
        self.store.append(annotator, item_id, action, body)
        return {"saved": True, "done": len(self.store.finished(annotator)), "total": len(self.items)}


def handler(app: App) -> type[BaseHTTPRequestHandler]:
    page = resources.files("llmft.annotate").joinpath("page.html").read_text(encoding="utf-8")

    class Handler(BaseHTTPRequestHandler):
        server_version = "llmft-annotate"

        def log_message(self, *args) -> None:  # quiet: the terminal shows progress, not every request
            pass

        def allowed(self) -> bool:
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
            if app.loopback and host not in LOOPBACK_NAMES:
                return self.fail(HTTPStatus.FORBIDDEN, f"host {host!r} is not this machine's loopback name")
            if app.token:
                given = self.headers.get("X-Llmft-Token") or query(self.path).get("token", "")
                if not hmac.compare_digest(given.encode(), app.token.encode()):
                    return self.fail(HTTPStatus.FORBIDDEN, "a valid token is needed (?token= in the address)")
            return True

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if not self.allowed():
                return
            url, q = urlparse(self.path), query(self.path)
            if url.path == "/":
                default = json.dumps(app.annotator or "").replace("<", "\\u003c")  # no </script> from a name
                return self.send(HTTPStatus.OK, page.replace("__DEFAULT_ANNOTATOR__", default),
                                 "text/html; charset=utf-8")
            if url.path == "/api/item":
                annotator = q.get("annotator", "")
                if not annotator.strip():
                    return self.fail(HTTPStatus.BAD_REQUEST, "an annotator name is needed")
                try:
                    index = int(q["index"]) if "index" in q else None
                except ValueError:
                    return self.fail(HTTPStatus.BAD_REQUEST, f"index must be a number, got {q['index']!r}")
                return self.json(HTTPStatus.OK, app.item_view(annotator, index))
            return self.fail(HTTPStatus.NOT_FOUND, f"no page {url.path}")

        def do_POST(self) -> None:  # noqa: N802
            if not self.allowed():
                return
            if urlparse(self.path).path != "/api/judge":
                return self.fail(HTTPStatus.NOT_FOUND, "judgements go to /api/judge")
            if not (self.headers.get("Content-Type") or "").startswith("application/json"):
                return self.fail(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "judgements are posted as application/json")
            try:
                size = int(self.headers.get("Content-Length") or 0)
                if not 0 <= size <= 1 << 20:
                    raise ValueError(f"a body of {size} bytes")
                body = json.loads(self.rfile.read(size) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("not an object")
            except ValueError as e:
                return self.fail(HTTPStatus.BAD_REQUEST, f"not a JSON object: {e}")
            try:
                return self.json(HTTPStatus.OK, app.judge(body))
            except (LlmftError, TypeError, ValueError) as e:  # a bad judgement: nothing was written
                return self.fail(HTTPStatus.BAD_REQUEST, str(e))

        def json(self, status: HTTPStatus, obj: dict) -> None:
            self.send(status, json.dumps(obj, ensure_ascii=False), "application/json")

        def fail(self, status: HTTPStatus, message: str) -> bool:
            self.json(status, {"error": message})
            return False

        def send(self, status: HTTPStatus, text: str, ctype: str) -> None:
            data = text.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; "
                                                        "style-src 'unsafe-inline'")
            self.end_headers()
            self.wfile.write(data)

    return Handler


def query(path: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlparse(path).query).items()}


def make_server(app: App, host: str, port: int) -> ThreadingHTTPServer:
    try:
        return ThreadingHTTPServer((host, port), handler(app))
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
