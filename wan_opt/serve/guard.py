"""What stands between the network and the page: the Host a loopback server answers to, the token another
address needs, where changes may come from, and the headers that keep a browser from running anything the
page did not ship.

An ASGI wrapper of its own (no framework middleware): it looks at every request before the app does.
"""
from __future__ import annotations

import hmac
from http.cookies import SimpleCookie
from typing import Iterable
from urllib.parse import parse_qsl, urlencode

COOKIE = "wan_opt_token"
# Only the page's own files run or load; nothing is framed; no address is leaked to a link's target.
HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                                 b"media-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
                                 b"form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


async def _answer(send, status: int, text: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = (text + "\n").encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                            *HEADERS, *headers]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Wraps the app. `token`: required of every request when set (as ?token=, then a cookie, or a Bearer
    header). `hosts`: the Host headers a loopback server answers to (a page elsewhere that resolves its own
    name to 127.0.0.1 is refused); None to accept any, behind the token."""

    def __init__(self, app, token: str | None, hosts: set[str] | None):
        self.app, self.token, self.hosts = app, token, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.hosts is not None and host not in self.hosts:
            return await _answer(send, 403, f"This page answers to {sorted(self.hosts)[0]} only.")
        if self.token is not None:
            query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
            given = dict(query).get("token")
            if given is not None and scope["method"] == "GET":
                if not hmac.compare_digest(given.encode(), self.token.encode()):
                    return await _answer(send, 401, "That token is not this server's: use the address it printed.")
                # Swap the token in the address for a cookie, and drop it from the address bar.
                rest = urlencode([(k, v) for k, v in query if k != "token"])
                location = scope["path"] + (f"?{rest}" if rest else "")
                cookie = f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
                return await _answer(send, 303, "See the page.", [(b"location", location.encode("latin-1")),
                                                                  (b"set-cookie", cookie.encode("latin-1"))])
            if not self._has_token(headers):
                return await _answer(send, 401, "This server needs its token: open the address it printed, "
                                                "with ?token=... in it.")
        if scope["method"] not in ("GET", "HEAD"):
            origin = headers.get("origin")
            if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
                return await _answer(send, 403, "Changes are taken only from this server's own page.")
            kind = headers.get("content-type", "").split(";")[0].strip()
            if kind != "application/json" and not kind.startswith("image/"):
                return await _answer(send, 415, "Send JSON (Content-Type: application/json).")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *HEADERS]}
            await send(message)

        return await self.app(scope, receive, send_with_headers)

    def _has_token(self, headers: dict[str, str]) -> bool:
        expected = self.token.encode()
        bearer = headers.get("authorization", "")
        if bearer.startswith("Bearer ") and hmac.compare_digest(bearer[7:].encode(), expected):
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # a malformed Cookie header is no token
            return False
        morsel = cookie.get(COOKIE)
        return morsel is not None and hmac.compare_digest(morsel.value.encode(), expected)


def allowed_hosts(host: str, port: int) -> set[str] | None:
    """The Host headers a server bound to `host:port` answers to: its loopback names, or any behind a token."""
    if not is_loopback(host):
        return None
    return {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]")} | ({host + f":{port}"})
