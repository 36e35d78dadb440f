"""Webhooks for ``callback_url``: address policy, signing, delivery, the delivery record.

Server-side request forgery is stopped where the connection is made: the host
is resolved, every address it resolves to must be allowed, and the connection
goes to one of those vetted addresses (never to a second resolution of the
name). Redirects are not followed. Loopback, private, link-local, multicast,
reserved and cloud-metadata addresses are refused unless the configured
allow-list names the host or a network containing the address; the well-known
cloud-metadata addresses are refused even then.

Bodies are signed with HMAC-SHA256 over ``"<timestamp>.<body>"``::

    X-ImageGenX-Timestamp: 1718000000
    X-ImageGenX-Signature: sha256=<hex>
    X-ImageGenX-Delivery: <task id>      (the completion; the same on every retry:
                                          deduplicate on it; ``<task id>:<event>:<n>``
                                          for started and progress, see
                                          imagegenx.webhook_events)

A receiver recomputes the signature with the shared secret over the raw body
and refuses timestamps older than a few minutes (see :func:`verify_signature`).

This module needs neither Celery nor Flask: the API uses the address policy
to check literal addresses early, the worker's delivery task uses the rest.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]

SIGNATURE_HEADER = "X-ImageGenX-Signature"
TIMESTAMP_HEADER = "X-ImageGenX-Timestamp"
DELIVERY_HEADER = "X-ImageGenX-Delivery"
RECORD_PREFIX = "imagegenx:webhook:"
MAX_RESPONSE_BYTES = 64 * 1024

# Instance-metadata endpoints of the big clouds (AWS, ECS, GCP, Azure, Alibaba,
# Oracle). Never reachable by a webhook, allow-list or not.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "169.254.169.253", "fd00:ec2::254",
    "100.100.100.200", "192.0.0.192",
))
# Answers that are worth another attempt; any other non-2xx answer is final.
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class WebhookRefused(ValueError):
    """The URL may not be called (scheme, host or address not allowed)."""


class DeliveryError(Exception):
    """One attempt failed (network error, DNS failure or an unwanted answer)."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


# -- address policy --------------------------------------------------------

@dataclass(frozen=True)
class AllowList:
    """Host names and networks a webhook may reach although they are not public."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> "AllowList":
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in entries:
            entry = raw.strip().lower().rstrip(".")
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry)
        return cls(frozenset(hosts), tuple(networks))

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows_address(self, addr: IPAddress) -> bool:
        return any(addr.version == net.version and addr in net for net in self.networks)


# IPv6 prefixes that carry an IPv4 address a translator or tunnel delivers to.
NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: IPv4 in the last 32 bits
NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215: IPv4 in bits 48-63 and 72-87
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated ::a.b.c.d (:: and ::1 excluded)


def embedded_ipv4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address stands for: IPv4-mapped and -compatible,
    NAT64, 6to4 and Teredo (both its server and its client). Empty when none."""
    if addr.ipv4_mapped is not None:
        return [addr.ipv4_mapped]
    packed = addr.packed
    if addr in NAT64_WELL_KNOWN:
        return [ipaddress.IPv4Address(packed[12:])]
    if addr in NAT64_LOCAL:
        return [ipaddress.IPv4Address(packed[6:8] + packed[9:11])]
    if addr.sixtofour is not None:
        return [addr.sixtofour]
    if addr.teredo is not None:
        return list(addr.teredo)
    if addr in IPV4_COMPATIBLE and int(addr) > 1:
        return [ipaddress.IPv4Address(packed[12:])]
    return []


def _judged_as(addr: IPAddress) -> list[IPAddress]:
    """The addresses a connection to ``addr`` reaches: ``::ffff:10.0.0.1`` or
    ``64:ff9b::a00:1`` is 10.0.0.1 as far as the network goes: judge it as such."""
    if isinstance(addr, ipaddress.IPv6Address):
        embedded: list[IPAddress] = list(embedded_ipv4(addr))
        if embedded:
            return embedded
    return [addr]


def address_refusal(addr: IPAddress, allow: AllowList = AllowList()) -> str | None:
    """Why a webhook may not connect to ``addr``, or None if it may."""
    for judged in _judged_as(addr):
        reason = _refusal(judged, allow)
        if reason is not None:
            return reason
    return None


def _refusal(addr: IPAddress, allow: AllowList) -> str | None:
    if addr in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if allow.allows_address(addr):
        return None
    if addr.is_loopback:
        return "a loopback address"
    if addr.is_link_local:
        return "a link-local address"
    if addr.is_unspecified:
        return "an unspecified address"
    if addr.is_multicast:
        return "a multicast address"
    if addr.is_private:
        return "a private address"
    if not addr.is_global:
        return "not a public address"
    return None


def check_url(url: str, allow: AllowList = AllowList()) -> str:
    """Syntax and literal-address check, done when a request is validated.

    Host names are resolved at delivery time (:func:`vet`), not here.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise WebhookRefused("must be an http or https URL")
    if not parts.hostname:
        raise WebhookRefused("must name a host")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise WebhookRefused("has an invalid port") from None
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise WebhookRefused("must not contain spaces or control characters")
    addr = literal_address(parts.hostname)
    if addr is None:
        return url
    reason = address_refusal(addr, allow)
    if reason is not None:
        raise WebhookRefused(f"must not point at {reason} (private, loopback and link-local "
                             "addresses are refused)")
    return url


def literal_address(host: str) -> IPAddress | None:
    """The address a host string denotes by itself, or None for a name.

    Besides the usual forms this catches the ones the C library also accepts
    (``127.1``, ``0x7f.0.0.1``, ``2130706433``), which would otherwise pass
    for names here and connect to loopback.
    """
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefx." for c in host.lower()) and host[0].isdigit():
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


@dataclass(frozen=True)
class Target:
    """A vetted destination: where to connect, and what to say in Host / SNI."""

    scheme: str
    host: str
    port: int
    path: str
    addresses: tuple[str, ...]

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def vet(url: str, allow: AllowList = AllowList(), resolver: Resolver = system_resolver) -> Target:
    """Resolve the URL's host and check every address it resolves to.

    Raises WebhookRefused if any address is not allowed, DeliveryError if the
    name does not resolve (which may be temporary).
    """
    check_url(url, allow)
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    literal = literal_address(host)
    if literal is not None:
        names = [str(literal)]
    else:
        try:
            names = resolver(host, port)
        except (OSError, UnicodeError) as exc:
            raise DeliveryError(f"cannot resolve {host}: {exc}") from exc
        if not names:
            raise DeliveryError(f"{host} resolves to no address")
    trusted_name = literal is None and allow.allows_host(host)
    addresses: list[str] = []
    for name in names:
        addr = ipaddress.ip_address(name.split("%", 1)[0])  # drop an IPv6 zone index
        reason = address_refusal(addr, allow)
        if reason == "a cloud metadata address" or (reason is not None and not trusted_name):
            raise WebhookRefused(f"{host} resolves to {addr}, {reason}")
        if str(addr) not in addresses:
            addresses.append(str(addr))
    return Target(parts.scheme, host, port, path, tuple(addresses))


# -- signing ---------------------------------------------------------------

def encode_body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(secret: str, body: bytes, timestamp: str | None, signature: str | None,
                     tolerance_s: float = 300.0, now: float | None = None) -> bool:
    """What a receiver does: recompute the signature, refuse stale timestamps."""
    if not timestamp or not signature or not timestamp.isdigit():
        return False
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def signed_headers(secret: str, body: bytes, delivery_id: str, now: float | None = None) -> dict[str, str]:
    from imagegenx import __version__

    timestamp = str(int(time.time() if now is None else now))
    return {
        "Content-Type": "application/json",
        "User-Agent": f"ImageGenX-Webhook/{__version__}",
        DELIVERY_HEADER: delivery_id,
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(secret, timestamp, body),
    }


def payload(task_id: str, state: str, result: dict[str, Any] | None = None,
            error: BaseException | None = None, event: str = "completed",
            progress: dict[str, Any] | None = None) -> dict[str, Any]:
    """The body a receiver gets: the fields of GET /api/v1/tasks/<id>, and which
    event (``callback_events``) it reports."""
    return {
        "task_id": task_id,
        "event": event,
        "state": state,
        "progress": progress,
        "result": result,
        "error": None if error is None else {"type": type(error).__name__, "message": str(error)},
    }


# -- one attempt -------------------------------------------------------------

def post(target: Target, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    """POST once to the vetted addresses (first one that connects). Returns the status.

    Raises DeliveryError when no address answers, or the answer is not 2xx.
    """
    import urllib3

    # One attempt holds the worker's pool thread for at most timeout_s per
    # address (at most two addresses are tried): connect and answer together.
    timeout = urllib3.Timeout(total=timeout_s, connect=timeout_s)
    last: Exception | None = None
    for address in target.addresses[:2]:
        if target.scheme == "https":
            tls_name = None if _is_ip(target.host) else target.host
            pool: urllib3.HTTPConnectionPool = urllib3.HTTPSConnectionPool(
                address, target.port, timeout=timeout, retries=False, maxsize=1,
                cert_reqs="CERT_REQUIRED", server_hostname=tls_name,
                assert_hostname=target.host,
            )
        else:
            pool = urllib3.HTTPConnectionPool(address, target.port, timeout=timeout,
                                              retries=False, maxsize=1)
        try:
            resp = pool.urlopen("POST", target.path, body=body,
                                headers={**headers, "Host": target.host_header},
                                redirect=False, retries=False, assert_same_host=False,
                                preload_content=False)
            try:
                resp.read(MAX_RESPONSE_BYTES, decode_content=False)
            finally:
                resp.release_conn()
        except urllib3.exceptions.NewConnectionError as exc:
            last = exc
            continue
        except urllib3.exceptions.HTTPError as exc:
            raise DeliveryError(f"{type(exc).__name__}: {_short(exc)}") from exc
        finally:
            pool.close()
        status = resp.status
        if 200 <= status < 300:
            return status
        retryable = status in RETRYABLE_STATUS
        raise DeliveryError(f"receiver answered {status}" + ("" if retryable else " (not retried)"),
                            status=status, retryable=retryable)
    raise DeliveryError(f"cannot connect to {target.host}: {_short(last)}")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _short(exc: BaseException | None) -> str:
    text = str(exc) if exc is not None else "no address"
    return text if len(text) <= 300 else text[:297] + "..."


def backoff_s(retries_done: int, base_s: float, max_s: float) -> float:
    """Delay before the next attempt: base, 2 base, 4 base, ... at most max."""
    return float(min(max_s, base_s * (2 ** retries_done)))


# -- delivery record ---------------------------------------------------------

class DeliveryRecord:
    """Each task's delivery state and attempts, under ``imagegenx:webhook:<task id>``.

    Kept apart from the Celery result (which is never overwritten once
    SUCCESS) and read by GET /api/v1/tasks/<id> as its ``webhook`` field.
    Only the delivery task of that task id writes it, one attempt at a time.
    """

    def __init__(self, client: Any, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s

    @staticmethod
    def key(task_id: str) -> str:
        return RECORD_PREFIX + task_id

    def get(self, task_id: str) -> dict[str, Any] | None:
        raw = self.client.get(self.key(task_id))
        return None if raw is None else json.loads(raw)

    def _put(self, task_id: str, record: dict[str, Any]) -> None:
        self.client.set(self.key(task_id), json.dumps(record), ex=self.ttl_s)

    def queued(self, task_id: str) -> None:
        self._put(task_id, {"state": "queued", "attempts": [], "delivered_at": None, "reason": None})

    def update(self, task_id: str, state: str, attempt: dict[str, Any] | None = None,
               reason: str | None = None) -> dict[str, Any]:
        record = self.get(task_id) or {"state": "queued", "attempts": [], "delivered_at": None,
                                       "reason": None}
        if attempt is not None:
            record["attempts"].append(attempt)
        record["state"] = state
        record["reason"] = reason
        if state == "delivered" and attempt is not None:
            record["delivered_at"] = attempt["at"]
        self._put(task_id, record)
        return record
