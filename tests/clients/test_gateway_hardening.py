"""The REST gateway against a hostile client: bodies capped while they stream (a lying Content-Length,
chunked), TLS off loopback and nothing but loopback without it, limit_concurrency, a deadline on request
heads and bodies, and the server's rate limit as 429 with Retry-After, shown by Trove's /limits
(python-troveclient's limits.list())."""
from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from reddwarf.client.gateway import BodyLimit, Gateway, GatewaySettings, check_listen, from_error, is_loopback
from reddwarf.common import errors
from tests.fixtures.mariadb import free_port
from tests.fixtures.server import RunningServer, start_server, stop_process

from .tenant import new_tenant

RATE = 20  # the module's server: 20 calls a minute per tenant
CAP = 1 << 20  # the gateway's default body cap


# -- the body cap, at the ASGI level: what the app pulls from the server is counted -------------------
def capped_app(cap: int) -> Any:
    async def parse(request: Request) -> Response:
        try:
            return JSONResponse({"got": await Gateway._json(request)})
        except errors.RedDwarfError as e:
            return from_error(e)
    return BodyLimit(Starlette(routes=[Route("/", parse, methods=["POST"])]), cap, body_timeout=2)


def drive(app: Any, headers: list[tuple[bytes, bytes]], chunk: bytes, chunks: int | None,
          pause: float = 0) -> tuple[int, int, dict[str, Any]]:
    """Runs one POST through the app with a body of `chunks` pieces (None: endless); returns (status, bytes the
    app read from the server, the JSON body)."""
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if pause:
            await asyncio.sleep(pause)
        n = pulled // len(chunk)
        more = chunks is None or n + 1 < chunks
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": more}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "raw_path": b"/", "query_string": b"",
             "headers": headers, "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1),
             "root_path": "", "asgi": {"version": "3.0"}}
    asyncio.run(app(scope, receive, send))
    import json
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], pulled, json.loads(body)


def test_a_lying_content_length_is_cut_at_the_cap():
    # It says 10 bytes; the framing under it (a broken proxy, another server) delivers forever.
    status, pulled, body = drive(capped_app(1000), [(b"content-length", b"10")], b"x" * 100, None)
    assert status == 413 and "overLimit" in body
    assert pulled == 1100  # the piece that crossed cap + 1, and not one more


def test_a_chunked_body_over_the_cap_is_cut_at_the_cap():
    status, pulled, body = drive(capped_app(1000), [(b"transfer-encoding", b"chunked")], b"y" * 300, None)
    assert status == 413 and pulled == 1200
    # Under the cap it is read whole.
    status, pulled, body = drive(capped_app(1000), [(b"transfer-encoding", b"chunked")], b"[1]", 1)
    assert status == 200 and body == {"got": [1]}


def test_declared_lengths_are_checked_before_reading():
    for value, code in ((b"1001", 413), (b"99999999999999999999999", 400), (b"-1", 400), (b"1e3", 400)):
        status, pulled, body = drive(capped_app(1000), [(b"content-length", value)], b"x", None)
        assert (status, pulled) == (code, 0), value
    status, pulled, body = drive(capped_app(1000), [], b"x", None)
    assert status == 411 and pulled == 0 and "lengthRequired" in body


def test_a_stalled_body_times_out():
    status, _, body = drive(capped_app(1000), [(b"content-length", b"500")], b"x", None, pause=3)
    assert status == 408 and "requestTimeout" in body


def test_listen_addresses():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "", "::", "10.0.0.1", "gateway.example"))
    assert check_listen(GatewaySettings(listen="127.0.0.1:8778")) == ("127.0.0.1", 8778)
    for bad in ("0.0.0.0:8778", ":8778", "[::]:8778", "10.1.2.3:443"):
        with pytest.raises(SystemExit, match="refusing to listen"):
            check_listen(GatewaySettings(listen=bad))
    assert check_listen(GatewaySettings(listen="0.0.0.0:443", tls_cert="c", tls_key="k")) == ("0.0.0.0", 443)
    with pytest.raises(SystemExit, match="go together"):
        check_listen(GatewaySettings(listen="127.0.0.1:1", tls_cert="c"))
    s = GatewaySettings.load(env={"REDDWARF_GATEWAY_LIMIT_CONCURRENCY": "7", "REDDWARF_ENDPOINT": "h:1",
                                  "REDDWARF_GATEWAY_HEADER_TIMEOUT": "2.5"}, overrides={"max_body": 10})
    assert (s.limit_concurrency, s.api, s.header_timeout, s.max_body) == (7, "h:1", 2.5, 10)


# -- the real gateway process in front of the real server ---------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[RunningServer]:
    with start_server(tmp_path_factory.mktemp("gwh"), extra_env={"REDDWARF_API_RATE_LIMIT": str(RATE)}) as s:
        yield s


def gateway_cmd(server: RunningServer, listen: str, *args: str) -> list[str]:
    f = server.gateway_files
    return [sys.executable, "-m", "reddwarf.client.gateway", "--listen", listen, "--api", server.api,
            "--cert", str(f.cert), "--key", str(f.key), "--ca", str(f.ca), *args]


@contextmanager
def gateway(server: RunningServer, *args: str, host: str = "127.0.0.1", verify: Any = None) -> Iterator[str]:
    port = free_port()
    scheme = "https" if "--tls-cert" in args else "http"
    proc = subprocess.Popen(gateway_cmd(server, f"{host}:{port}", *args), stdout=subprocess.DEVNULL,
                            stderr=open(server.state_dir / "gateway-hardening.log", "ab"),  # noqa: SIM115
                            start_new_session=True)
    base = f"{scheme}://127.0.0.1:{port}"
    try:
        for _ in range(300):
            assert proc.poll() is None, (server.state_dir / "gateway-hardening.log").read_text()[-2000:]
            try:
                if httpx.get(base + "/", timeout=1, verify=verify if verify is not None else True).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield base
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def gw(server) -> Iterator[str]:
    with gateway(server, "--header-timeout", "1.5", "--body-timeout", "1.5") as base:
        yield base


def raw(base: str, data: bytes) -> socket.socket:
    host, port = base.rsplit("/", 1)[-1].split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(data)
    return s


def response(s: socket.socket) -> bytes:
    """One response: its head and its Content-Length's worth of body."""
    out = b""
    while b"\r\n\r\n" not in out:
        piece = s.recv(65536)
        if not piece:
            return out
        out += piece
    head, _, body = out.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        piece = s.recv(65536)
        if not piece:
            break
        body += piece
    return head + b"\r\n\r\n" + body


def test_declared_length_over_the_cap_is_413_before_any_body(server, gw):
    tid, token = new_tenant(server, "h")
    s = raw(gw, f"POST /v1.0/{tid}/instances HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {5 * CAP}\r\n\r\n".encode())
    with s:
        head = response(s)  # not one byte of the body was sent
    assert head.startswith(b"HTTP/1.1 413") and b"overLimit" in head
    # httpx, which sends the whole body first, gets the same answer.
    r = httpx.post(f"{gw}/v1.0/{tid}/instances", content=b"x" * (CAP + 1), headers={"X-Auth-Token": token})
    assert r.status_code == 413 and r.json()["overLimit"]["code"] == 413


def test_chunked_body_over_the_cap_is_refused_while_it_is_still_streaming(server, gw):
    tid, token = new_tenant(server, "h")
    s = raw(gw, f"POST /v1.0/{tid}/instances HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {token}\r\n"
                "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    piece = b"z" * 65536
    with s:
        for _ in range(CAP // len(piece) + 2):  # cap + 128 KiB, and never the terminating chunk
            s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        # Had the gateway waited for the whole body it would wait forever: the 413 proves it stopped.
        head = response(s)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    # A small chunked body is read and parsed as usual (a Trove 400 for its content, not a framing error).
    body = b'{"instance": 3}'
    s = raw(gw, f"POST /v1.0/{tid}/instances HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {token}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n".encode() + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    with s:
        assert response(s).startswith(b"HTTP/1.1 400")


def test_body_without_length_is_411(server, gw):
    tid, token = new_tenant(server, "h")
    with raw(gw, f"POST /v1.0/{tid}/instances HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {token}\r\n\r\n".encode()) as s:
        head = response(s)
    assert head.startswith(b"HTTP/1.1 411") and b"lengthRequired" in head


def test_slow_request_head_is_cut_off(gw):
    t0 = time.monotonic()
    with raw(gw, b"GET / HTTP/1.1\r\nHost: x\r\n") as s:
        for _ in range(100):  # a header byte every 0.2 s: uvicorn alone would wait forever
            try:
                s.sendall(b"X")
            except OSError:  # the gateway closed the connection (EPIPE / ECONNRESET)
                break
            time.sleep(0.2)
        else:
            pytest.fail("the slow request head was never cut off")
    assert 1.4 < time.monotonic() - t0 < 5
    # A connection that sends nothing at all is closed too.
    t0 = time.monotonic()
    with raw(gw, b"") as s:
        assert s.recv(100) == b""
    assert 1.4 < time.monotonic() - t0 < 5
    assert httpx.get(gw + "/").status_code == 200  # and the gateway serves on


def closed_by_peer(s: socket.socket) -> bool:
    """Whether the peer has closed the connection (EOF or reset), waiting up to the socket's timeout."""
    try:
        while s.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True


def test_an_oversized_request_head_is_431_and_closed(gw):
    big = b"X-Padding: " + b"p" * (20 * 1024) + b"\r\n"  # over the default 16 KiB
    # Whole, in one write: the head is complete, and still refused.
    with raw(gw, b"GET / HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n") as s:
        head = response(s)
        assert head.startswith(b"HTTP/1.1 431") and b"larger than 16384 bytes" in head
        assert closed_by_peer(s)
    # Dripping in and never finished: refused once past the cap, without waiting for the end of the head.
    with raw(gw, b"GET / HTTP/1.1\r\nHost: x\r\nX-Padding: ") as s:
        sent = 0
        s.settimeout(0.05)
        head = b""
        while sent < 64 * 1024 and not head:
            try:
                s.sendall(b"p" * 1024)
            except OSError:  # closed by the gateway while we were still sending: it answered first
                break
            sent += 1024
            try:
                head = s.recv(65536)
            except TimeoutError:
                pass
        s.settimeout(5)
        head = head or response(s)
        assert head.startswith(b"HTTP/1.1 431"), head[:100]
        assert 16 * 1024 <= sent <= 24 * 1024
    # A big head under the cap is served, and so is everything after.
    with raw(gw, b"GET / HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"p" * (12 * 1024) + b"\r\n\r\n") as s:
        assert response(s).startswith(b"HTTP/1.1 200")
    assert httpx.get(gw + "/").status_code == 200


def test_malformed_framing_and_host_are_400(gw):
    for bad in (b"GET / HTTP/1.1\r\n\r\n",                                           # no Host
                b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",                       # two
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3x\r\n\r\nabc",
                # a body framed two ways: the way request smuggling through a proxy starts
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n0\r\n\r\n",
                b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n"):                # TLS on the plain port
        with raw(gw, bad) as s:
            assert response(s).startswith(b"HTTP/1.1 400"), bad
            assert closed_by_peer(s)
    with raw(gw, b"GET / HTTP/1.0\r\n\r\n") as s:  # HTTP/1.0 has no Host to require
        assert response(s).startswith(b"HTTP/1.1 200")


def test_shutdown_finishes_the_request_in_flight_and_closes_idle_connections(server):
    """SIGTERM: the gateway stops accepting, closes idle keep-alive connections at once, lets a request it is
    still reading finish (answered with Connection: close), then exits."""
    tid, token = new_tenant(server, "h")
    port = free_port()
    proc = subprocess.Popen(gateway_cmd(server, f"127.0.0.1:{port}"), stdout=subprocess.DEVNULL,
                            stderr=open(server.state_dir / "gateway-hardening.log", "ab"),  # noqa: SIM115
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            assert proc.poll() is None
            try:
                if httpx.get(base + "/", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        idle = raw(base, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert response(idle).startswith(b"HTTP/1.1 200")  # kept alive, now idle
        body = b'{"instance": 3}'
        busy = raw(base, f"POST /v1.0/{tid}/instances HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {token}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:5])
        time.sleep(1)  # the handler has checked the token and waits for the rest of the body
        proc.send_signal(signal.SIGTERM)
        idle.settimeout(5)
        assert closed_by_peer(idle)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        assert proc.poll() is None  # still serving the request in flight
        busy.sendall(body[5:])
        busy.settimeout(10)
        head = response(busy)
        assert head.startswith(b"HTTP/1.1 400") and b"connection: close" in head.lower(), head
        assert closed_by_peer(busy)
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it caught
        idle.close()
        busy.close()
    finally:
        stop_process(proc)


def test_stalled_body_is_408(server, gw):
    tid, token = new_tenant(server, "h")
    with raw(gw, f"POST /v1.0/{tid}/instances HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {token}\r\n"
                 "Content-Length: 100\r\n\r\n{\"inst".encode()) as s:
        head = response(s)
    assert head.startswith(b"HTTP/1.1 408")


def test_a_body_dripping_in_is_408_and_the_rest_of_a_refused_body_is_not_waited_for(server, gw):
    tid, token = new_tenant(server, "h")
    t0 = time.monotonic()
    with raw(gw, f"POST /v1.0/{tid}/instances HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {token}\r\n"
                 "Content-Length: 100\r\n\r\n".encode()) as s:
        s.settimeout(0.25)
        head = b""
        for _ in range(40):  # a byte every 0.25 s: each read gets data, the whole body never comes
            s.sendall(b" ")
            try:
                head = response(s)
                break
            except TimeoutError:
                continue
        assert head.startswith(b"HTTP/1.1 408"), head
        assert time.monotonic() - t0 < 5
        # It has been answered; the rest of its body keeps coming, and after body_timeout the gateway hangs up.
        answered = time.monotonic()
        s.settimeout(None)
        closed = False
        for _ in range(40):
            try:
                s.sendall(b" ")
                time.sleep(0.25)
                closed = s.recv(1, socket.MSG_DONTWAIT) == b""
            except BlockingIOError:  # still open, nothing to read
                continue
            except OSError:  # reset by the gateway
                closed = True
            if closed:
                break
        assert closed and 1.2 < time.monotonic() - answered < 5


def test_limit_concurrency_answers_503(server):
    with gateway(server, "--limit-concurrency", "3") as base:
        idle = [raw(base, b"") for _ in range(2)]
        try:
            time.sleep(0.2)
            r = httpx.get(base + "/")
            assert r.status_code == 503
        finally:
            for s in idle:
                s.close()
        time.sleep(0.3)
        assert httpx.get(base + "/").status_code == 200


def test_plain_http_off_loopback_is_refused(server):
    r = subprocess.run(gateway_cmd(server, f"0.0.0.0:{free_port()}"), capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "refusing to listen on 0.0.0.0" in r.stderr and "--tls-cert" in r.stderr


def test_tls_with_a_certificate_from_the_deployment_ca(server, tmp_path):
    files = server.ca.write_identity(tmp_path / "https", "gateway-https", "gateway", "gateway-https",
                                     dns_names=["gateway.test"], ip_addresses=["127.0.0.1"])
    trust = ssl.create_default_context(cafile=str(files.ca))
    tid, token = new_tenant(server, "h")
    # Off loopback, with TLS: allowed.
    with gateway(server, "--tls-cert", str(files.cert), "--tls-key", str(files.key), host="0.0.0.0",
                 verify=trust) as base:
        assert base.startswith("https://")
        r = httpx.get(f"{base}/v1.0/{tid}/flavors", headers={"X-Auth-Token": token}, verify=trust)
        assert r.status_code == 200 and r.json()["flavors"]
        with pytest.raises(httpx.ConnectError):  # not trusted without the deployment CA
            httpx.get(base + "/", verify=ssl.create_default_context())
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on the TLS port
            httpx.get(base.replace("https://", "http://") + "/")


def test_rate_limit_is_429_with_retry_after(server, gw):
    tid, token = new_tenant(server, "h")
    h = {"X-Auth-Token": token}
    codes = [httpx.get(f"{gw}/v1.0/{tid}/flavors", headers=h).status_code for _ in range(RATE)]
    assert codes == [200] * RATE  # the tenant check's GetCaller costs nothing
    # The bucket refills a call every 60 / RATE s: on a loaded machine the RATE calls above may have taken that
    # long, so a refilled call or two may still pass before the 429.
    for _ in range(3):
        r = httpx.get(f"{gw}/v1.0/{tid}/flavors", headers=h)
        if r.status_code != 200:
            break
    assert r.status_code == 429
    after = int(r.headers["Retry-After"])
    assert 1 <= after <= 60 / RATE + 1
    assert r.json()["overLimit"]["code"] == 429 and r.json()["overLimit"]["retryAfter"] == str(after)
    # Another tenant is unaffected.
    tid2, token2 = new_tenant(server, "h")
    assert httpx.get(f"{gw}/v1.0/{tid2}/flavors", headers={"X-Auth-Token": token2}).status_code == 200


def test_limits_in_trove_shape_and_through_troveclient(server, gw):
    tid, token = new_tenant(server, "h")
    r = httpx.get(f"{gw}/v1.0/{tid}/limits", headers={"X-Auth-Token": token})
    assert r.status_code == 200
    absolute, rate = r.json()["limits"]
    assert absolute["verb"] == "ABSOLUTE" and absolute["max_instances"] == 10 and absolute["max_backups"] == 50
    assert {k: rate[k] for k in ("verb", "uri", "regex", "value", "unit", "remaining")} == {
        "verb": "*", "uri": "*", "regex": ".*", "value": RATE, "unit": "MINUTE", "remaining": RATE - 1}
    assert rate["nextAvailable"].endswith("Z")
    from keystoneauth1 import session, token_endpoint
    from troveclient.v1 import client
    trove = client.Client(session=session.Session(auth=token_endpoint.Token(f"{gw}/v1.0/{tid}", token)))
    limits = trove.limits.list()
    assert limits[0].verb == "ABSOLUTE" and limits[0].max_instances == 10
    assert (limits[1].verb, limits[1].value, limits[1].unit, limits[1].remaining) == ("*", RATE, "MINUTE", RATE - 2)
