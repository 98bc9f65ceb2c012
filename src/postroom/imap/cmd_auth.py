"""Any-state and not-authenticated commands: CAPABILITY, NOOP, LOGOUT, STARTTLS, LOGIN, AUTHENTICATE,
ENABLE, ID, NAMESPACE (RFC 9051 §6.1-6.3, RFC 4959 SASL-IR, RFC 5161, RFC 2971, RFC 2342).

Invariants: LOGIN and AUTHENTICATE are refused with ``[PRIVACYREQUIRED]`` until TLS is on (unless the
listener allows plaintext on loopback); a failed login answers the same way for unknown users and wrong
passwords; credentials are never logged.
"""

from __future__ import annotations

import logging

from postroom.auth.sasl import Challenge, Credentials, SaslCancelled, SaslError, SaslExchange
from postroom.imap.core import No, Outcome, Session, State
from postroom.imap.encode import qstr
from postroom.imap.grammar import BadArgs, arity, astring, atom
from postroom.imap.tokens import Token

log = logging.getLogger(__name__)

ENABLEABLE = {"CONDSTORE": "CONDSTORE", "QRESYNC": "QRESYNC", "IMAP4REV2": "IMAP4rev2"}
SERVER_ID = (("name", "Postroom"), ("vendor", "Postroom"), ("support-url", "https://example.invalid/"))


async def capability(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    arity(args, 0)
    s.untagged("CAPABILITY " + s.capabilities())
    s.tagged(tag, "OK", "CAPABILITY completed")
    return None


async def noop(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    arity(args, 0)
    await s.poll(allow_expunge=True, force=True)
    s.tagged(tag, "OK", "NOOP completed")
    return None


async def logout(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    arity(args, 0)
    s.untagged("BYE Postroom logging out")
    s.tagged(tag, "OK", "LOGOUT completed")
    s.deselect()
    s.state = State.LOGOUT
    return Outcome.LOGOUT


async def starttls(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    arity(args, 0)
    if not s.starttls_available:
        raise BadArgs("TLS is already active" if s.tls else "STARTTLS is not offered here")
    s.tagged(tag, "OK", "Begin TLS negotiation now")
    s.starttls_available = False
    s.tls = True
    return Outcome.STARTTLS


async def _login_done(s: Session, tag: str, username: str, password: str) -> None:
    account = await s.authenticate(username, password, s.peer_ip)
    if account is None:
        raise No("Authentication failed", "AUTHENTICATIONFAILED")
    if not s.admit(account.address, s.peer_ip):
        raise No("Too many connections for this user from this address", "LIMIT")
    s.account = account
    s.state = State.AUTH
    log.info("imap login %s from %s", account.address, s.peer_ip)
    s.tagged(tag, "OK", "Logged in", "CAPABILITY " + s.capabilities())


async def login(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    arity(args, 2)
    if not s.login_allowed:
        raise No("LOGIN needs TLS first (STARTTLS)", "PRIVACYREQUIRED")
    await _login_done(s, tag, astring(args[0]), astring(args[1]))
    return None


async def authenticate(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    arity(args, 1, 2)
    if not s.login_allowed:
        raise No("AUTHENTICATE needs TLS first (STARTTLS)", "PRIVACYREQUIRED")
    mech = atom(args[0]).upper()
    try:
        exchange = SaslExchange(mech)
    except SaslError:
        raise No(f"Unsupported mechanism {mech[:40]}", "CANNOT") from None
    initial = None
    if len(args) == 2:
        tok = args[1]
        if isinstance(tok, list):
            raise BadArgs("bad initial response")
        initial = tok if isinstance(tok, bytes) else tok.encode()
    try:
        step: Challenge | Credentials = exchange.start(initial)
        while isinstance(step, Challenge):
            s.send(b"+ " + step.data + b"\r\n")
            await s.flush_drain()
            line = await s.io.read_line()
            if line is None:
                return Outcome.LOGOUT
            step = exchange.respond(line)
    except SaslCancelled:
        s.tagged(tag, "BAD", "Authentication cancelled")
        return None
    except SaslError as exc:
        s.tagged(tag, "BAD", str(exc))
        return None
    if step.authzid and step.authzid.lower() != step.username.lower():
        raise No("Authorization identity differs from authentication identity", "AUTHORIZATIONFAILED")
    await _login_done(s, tag, step.username, step.password)
    return None


async def enable(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    if not args:
        raise BadArgs("ENABLE needs capabilities")
    done: list[str] = []
    for tok in args:
        cap = atom(tok).upper()
        name = ENABLEABLE.get(cap)
        if name is None or cap in s.enabled:
            continue
        s.enabled.add(cap)
        if cap in ("CONDSTORE", "QRESYNC"):
            s.condstore = True
        done.append(name)
    s.untagged("ENABLED" + "".join(" " + d for d in done))
    s.tagged(tag, "OK", "ENABLE completed")
    return None


async def ident(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    arity(args, 1)
    params = args[0]
    if isinstance(params, list):
        if len(params) % 2 or len(params) > 60:
            raise BadArgs("ID takes field/value pairs")
        for k, v in zip(params[::2], params[1::2], strict=True):
            key = astring(k)[:30]
            value = "NIL" if v == "NIL" else astring(v)[:1024]
            s.client_id[key] = value
        log.info("imap client id %s", {k: v for k, v in s.client_id.items() if k in ("name", "version")})
    elif params != "NIL":
        raise BadArgs("ID takes NIL or a list")
    body = b" ".join(qstr(k) + b" " + qstr(v) for k, v in SERVER_ID)
    s.send(b"* ID (" + body + b")\r\n")
    s.tagged(tag, "OK", "ID completed")
    return None


async def namespace(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    arity(args, 0)
    s.untagged('NAMESPACE (("" "/")) NIL NIL')
    s.tagged(tag, "OK", "NAMESPACE completed")
    return None
