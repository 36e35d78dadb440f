"""Webhook pieces without a worker: address policy (SSRF), resolution and vetting,
signatures, one HTTP attempt against a local receiver, and the API's checks."""
from __future__ import annotations

import ipaddress
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from imagegenx.api import create_app
from imagegenx.settings import Settings
from imagegenx.webhooks import (
    AllowList, DeliveryError, Target, WebhookRefused, address_refusal, backoff_s, check_url,
    encode_body, post, sign, signed_headers, verify_signature, vet,
)

NO_ALLOW = AllowList()


@pytest.mark.parametrize(("addr", "reason"), [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
    ("fd12::1", "private"), ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("169.254.169.254", "cloud metadata"), ("fd00:ec2::254", "cloud metadata"),
    ("100.100.100.200", "cloud metadata"), ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"), ("100.64.0.1", "not a public"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"),
    # IPv4 embedded in IPv6 is judged by the IPv4 address it reaches.
    ("::127.0.0.1", "loopback"), ("::10.0.0.1", "private"),  # IPv4-compatible
    ("64:ff9b::a9fe:a9fe", "cloud metadata"), ("64:ff9b::7f00:1", "loopback"),  # NAT64
    ("64:ff9b::c0a8:101", "private"), ("64:ff9b:1:7f00:0:100::", "loopback"),  # local NAT64
    ("2002:7f00:1::1", "loopback"), ("2002:a9fe:a9fe::", "cloud metadata"),  # 6to4
    ("2002:c0a8:101::1", "private"),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),  # Teredo, client 127.0.0.1
])
def test_non_public_addresses_are_refused(addr: str, reason: str) -> None:
    refusal = address_refusal(ipaddress.ip_address(addr))
    assert refusal is not None and reason in refusal


@pytest.mark.parametrize("addr", ["93.184.215.14", "8.8.8.8", "2606:4700::1111",
                                  "64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(addr: str) -> None:
    assert address_refusal(ipaddress.ip_address(addr)) is None


def test_allow_list_opens_networks_and_hosts_but_never_metadata() -> None:
    allow = AllowList.parse(["127.0.0.1", "10.0.0.0/8", "Hooks.Internal."])
    assert address_refusal(ipaddress.ip_address("127.0.0.1"), allow) is None
    assert address_refusal(ipaddress.ip_address("10.9.9.9"), allow) is None
    assert address_refusal(ipaddress.ip_address("127.0.0.2"), allow) == "a loopback address"
    assert allow.allows_host("hooks.internal")
    wide = AllowList.parse(["169.254.0.0/16"])
    assert address_refusal(ipaddress.ip_address("169.254.169.254"), wide) == "a cloud metadata address"


@pytest.mark.parametrize(("url", "reason"), [
    ("ftp://example.com/x", "http or https"), ("file:///etc/passwd", "http or https"),
    ("gopher://example.com/", "http or https"), ("http:///path", "must name a host"),
    ("http://example.com:99999/", "invalid port"),
    ("http://127.0.0.1/", "loopback"), ("http://[::1]:80/", "loopback"),
    ("http://2130706433/", "loopback"), ("http://0x7f.0.0.1/", "loopback"),
    ("http://127.1/", "loopback"), ("http://10.0.0.1/", "private"),
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://[::ffff:169.254.169.254]/", "cloud metadata"),
    ("http://[::127.0.0.1]/", "loopback"), ("http://[64:ff9b::a9fe:a9fe]/", "cloud metadata"),
    ("http://[2002:7f00:1::1]/", "loopback"),
])
def test_urls_refused_before_any_connection(url: str, reason: str) -> None:
    with pytest.raises(WebhookRefused, match=reason):
        check_url(url)


def resolver(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError("Name or service not known")
        return table[host]
    return resolve


def test_a_name_is_refused_if_any_address_it_resolves_to_is_not_allowed() -> None:
    dns = resolver({"mixed.example": ["93.184.215.14", "10.0.0.5"],
                    "public.example": ["93.184.215.14", "2606:4700::1111"],
                    "meta.example": ["169.254.169.254"]})
    with pytest.raises(WebhookRefused, match="10.0.0.5, a private address"):
        vet("https://mixed.example/hook", NO_ALLOW, dns)
    with pytest.raises(WebhookRefused, match="cloud metadata"):
        vet("http://meta.example/", AllowList.parse(["meta.example"]), dns)
    target = vet("https://public.example:8443/hook?x=1", NO_ALLOW, dns)
    assert target.addresses == ("93.184.215.14", "2606:4700::1111")
    assert (target.host, target.port, target.path) == ("public.example", 8443, "/hook?x=1")
    assert target.host_header == "public.example:8443"


def test_allow_listed_names_and_networks_pass_vetting() -> None:
    dns = resolver({"hooks.internal": ["10.1.1.1"], "box.lan": ["192.168.0.7"]})
    assert vet("http://hooks.internal/h", AllowList.parse(["hooks.internal"]), dns).addresses == ("10.1.1.1",)
    assert vet("http://box.lan/h", AllowList.parse(["192.168.0.0/24"]), dns).addresses == ("192.168.0.7",)
    with pytest.raises(WebhookRefused):
        vet("http://box.lan/h", AllowList.parse(["hooks.internal"]), dns)


def test_localhost_is_refused_after_real_resolution() -> None:
    with pytest.raises(WebhookRefused, match="localhost resolves to .*loopback"):
        vet("http://localhost:8080/hook")


def test_an_unresolvable_name_is_a_retryable_delivery_error() -> None:
    with pytest.raises(DeliveryError, match="cannot resolve") as info:
        vet("http://nowhere.invalid/", NO_ALLOW, resolver({}))
    assert info.value.retryable


def test_signature_round_trip_and_what_it_refuses() -> None:
    body = encode_body({"task_id": "t", "state": "SUCCESS"})
    headers = signed_headers("s3cret", body, "t", now=1_700_000_000)
    ts, sig = headers["X-ImageGenX-Timestamp"], headers["X-ImageGenX-Signature"]
    assert ts == "1700000000" and sig.startswith("sha256=") and len(sig) == 7 + 64
    assert headers["X-ImageGenX-Delivery"] == "t"
    assert verify_signature("s3cret", body, ts, sig, now=1_700_000_100)
    assert not verify_signature("s3cret", body + b" ", ts, sig, now=1_700_000_100)  # tampered
    assert not verify_signature("other", body, ts, sig, now=1_700_000_100)  # wrong secret
    assert not verify_signature("s3cret", body, ts, sig, now=1_700_001_000)  # replayed late
    assert not verify_signature("s3cret", body, "1700000001", sig, now=1_700_000_100)  # other time
    # The signed string is "<timestamp>.<body>" (documented for receivers).
    import hashlib
    import hmac
    expected = hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sig == "sha256=" + expected == sign("s3cret", 1_700_000_000, body)


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff_s(n, 2.0, 30.0) for n in range(6)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


# -- one attempt against a local receiver ------------------------------------

class Receiver:
    """A threaded HTTP server on 127.0.0.1 answering from a list of status codes."""

    def __init__(self, statuses: list[int], location: str | None = None) -> None:
        self.statuses = statuses
        self.seen: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                outer.seen.append({"path": self.path, "headers": dict(self.headers),
                                   "body": self.rfile.read(length)})
                status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver([])
    yield r
    r.close()


def test_post_connects_to_the_vetted_address_not_to_a_new_lookup(receiver: Receiver) -> None:
    """The name below resolves nowhere: the request can only have reached the
    receiver through the vetted address, with the name kept in Host."""
    target = Target("http", "hooks.example.invalid", receiver.port, "/cb?t=1", ("127.0.0.1",))
    body = encode_body({"task_id": "abc", "state": "SUCCESS"})
    status = post(target, body, signed_headers("k", body, "abc"), timeout_s=5)
    assert status == 200
    (seen,) = receiver.seen
    assert seen["path"] == "/cb?t=1"
    assert seen["headers"]["Host"] == f"hooks.example.invalid:{receiver.port}"
    assert json.loads(seen["body"]) == {"task_id": "abc", "state": "SUCCESS"}
    h = seen["headers"]
    assert verify_signature("k", seen["body"], h["X-ImageGenX-Timestamp"], h["X-ImageGenX-Signature"])


@pytest.mark.parametrize(("status", "retryable"), [(500, True), (503, True), (429, True),
                                                   (404, False), (400, False)])
def test_error_answers_are_retryable_or_final(receiver: Receiver, status: int, retryable: bool) -> None:
    receiver.statuses = [status]
    target = Target("http", "127.0.0.1", receiver.port, "/", ("127.0.0.1",))
    with pytest.raises(DeliveryError) as info:
        post(target, b"{}", {}, timeout_s=5)
    assert info.value.status == status and info.value.retryable is retryable


def test_redirects_are_not_followed() -> None:
    inner = Receiver([])
    outer = Receiver([302], location=f"http://127.0.0.1:{inner.port}/stolen")
    try:
        target = Target("http", "127.0.0.1", outer.port, "/", ("127.0.0.1",))
        with pytest.raises(DeliveryError, match="302") as info:
            post(target, b"{}", {}, timeout_s=5)
        assert not info.value.retryable
        assert inner.seen == []
    finally:
        inner.close()
        outer.close()


def test_connection_refused_is_retryable() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DeliveryError, match="cannot connect") as info:
        post(Target("http", "127.0.0.1", port, "/", ("127.0.0.1",)), b"{}", {}, timeout_s=2)
    assert info.value.retryable


# -- API side -----------------------------------------------------------------

def api(redis_base: str, **kw: Any):  # type: ignore[no-untyped-def]
    key = f"key-{uuid.uuid4().hex}"
    s = Settings(broker_url=f"{redis_base}/3", result_backend=f"{redis_base}/3",
                 queue=f"unit-webhooks-{uuid.uuid4().hex[:8]}", api_keys=[key], **kw)
    client = create_app(s).test_client()
    return lambda body: client.post("/api/v1/images", json=body, headers={"X-API-Key": key})


def fields(r: Any) -> dict[str, str]:
    return {f["field"]: f["reason"] for f in r.json["fields"]}


def test_callback_url_needs_a_webhook_secret(redis_base: str) -> None:
    r = api(redis_base)({"prompt": "x", "callback_url": "https://example.com/hook"})
    assert r.status_code == 422
    assert "webhook secret" in fields(r)["callback_url"]


def test_allow_list_admits_a_literal_loopback_callback(redis_base: str) -> None:
    body = {"prompt": "x", "callback_url": "http://127.0.0.1:9/hook"}
    assert api(redis_base, webhook_secret="s")(body).status_code == 422
    assert api(redis_base, webhook_secret="s", webhook_allow_hosts="127.0.0.1")(body).status_code == 202
    r = api(redis_base, webhook_secret="s", webhook_allow_hosts="169.254.0.0/16")(
        {"prompt": "x", "callback_url": "http://169.254.169.254/"})
    assert r.status_code == 422 and "cloud metadata" in fields(r)["callback_url"]


def test_allow_list_entries_are_checked() -> None:
    with pytest.raises(ValueError, match="webhook_allow_hosts"):
        Settings(webhook_allow_hosts="10.0.0.0/33")
    with pytest.raises(ValueError, match="webhook_allow_hosts"):
        Settings(webhook_allow_hosts="bad host!")
    assert Settings(webhook_allow_hosts="Hooks.Example., 10.0.0.0/8").webhook_allow_hosts == [
        "hooks.example", "10.0.0.0/8"]


def test_backoff_cap_must_stay_under_the_visibility_timeout() -> None:
    with pytest.raises(ValueError, match="webhook_backoff_max_s"):
        Settings(visibility_timeout_s=600, webhook_backoff_max_s=900)


def test_a_hung_receiver_holds_an_attempt_for_at_most_the_timeout() -> None:
    """The pool thread that delivers webhooks is the worker's only one: a
    receiver that accepts and never answers must not keep it."""
    import socket
    import time

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    try:
        target = Target("http", "127.0.0.1", srv.getsockname()[1], "/", ("127.0.0.1",))
        t0 = time.perf_counter()
        with pytest.raises(DeliveryError) as info:
            post(target, b"{}", {}, timeout_s=0.5)
        assert time.perf_counter() - t0 < 1.5
        assert info.value.retryable
    finally:
        srv.close()
