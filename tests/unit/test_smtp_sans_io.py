"""The SMTP core and the wire helpers stay sans-I/O: no asyncio, socket, ssl or store, even indirectly.
Also the pure pieces: relay policy and trace headers."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from postroom.smtp import policy, trace
from postroom.wire import replies
from postroom.wire.address import Address, parse_path

CORE = [
    "postroom.smtp.server",
    "postroom.smtp.commands",
    "postroom.smtp.events",
    "postroom.smtp.policy",
    "postroom.smtp.trace",
    "postroom.smtp.limits",
    "postroom.wire.address",
    "postroom.wire.dotstuff",
    "postroom.wire.linebuffer",
    "postroom.wire.replies",
]
FORBIDDEN = ("asyncio", "socket", "ssl", "selectors", "postroom.store", "postroom.net", "postroom.app")


def _imports(module: str) -> set[str]:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    origin = Path(spec.origin)  # the source, also when a compiled extension was found (make native)
    tree = ast.parse(origin.with_name(origin.name.split(".", 1)[0] + ".py").read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize("module", CORE)
def test_core_module_is_sans_io(module: str) -> None:
    seen: set[str] = set()
    todo = [module]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        for imp in _imports(mod):
            assert not imp.startswith(FORBIDDEN), f"{mod} imports {imp} (reached from {module})"
            if imp.startswith("postroom."):
                todo.append(imp)


def test_received_header_cannot_be_broken_by_the_peer() -> None:
    header = trace.received(
        helo="evil\r\nX-Injected: yes (x)",
        peer_ip="::1",
        hostname="mx.example.test",
        protocol="ESMTPS",
        queue_id="q1",
        tls_info="TLSv1.3 TLS_AES_128_GCM_SHA256",
        recipient=Address("bob", "example.test"),
        now=0,
    )
    text = header.decode()
    assert text.count("\r\n") == 4 and "\r\nX-Injected" not in text
    assert text.startswith("Received: from evil??X-Injected:?yes??x? ([IPv6:::1])\r\n")
    assert "\t(using TLSv1.3 with cipher TLS_AES_128_GCM_SHA256)\r\n" in text
    assert text.endswith("\tfor <bob@example.test>; Thu, 01 Jan 1970 00:00:00 +0000\r\n")
    assert trace.return_path(None) == b"Return-Path: <>\r\n"


def test_policy_routes_on_the_final_address() -> None:
    def local(d: str) -> bool:
        return d == "example.test"

    def route(path: str, **kw: bool) -> object:
        a = parse_path(path)
        assert a is not None
        return policy.route_recipient(a, is_local_domain=local, **kw)

    assert route("<@example.test:x@far.test>", submission=False, authenticated=False) == replies.RELAY_DENIED
    assert route("<x%far.test@example.test>", submission=False, authenticated=False) == "local"
    assert route("<x@[127.0.0.1]>", submission=False, authenticated=False) == replies.RELAY_DENIED
    assert route("<x@far.test>", submission=True, authenticated=False) == replies.RELAY_DENIED
    assert route("<x@far.test>", submission=True, authenticated=True) == "remote"
    assert policy.postmaster_address(Address("postmaster", ""), ("example.test",)) == "postmaster@example.test"
    assert policy.postmaster_address(Address("postmaster", ""), ()) is None
