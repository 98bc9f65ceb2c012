"""``postroom burst --check``: connect, negotiate TLS, authenticate, send nothing, and explain failures.

The settings confusion this answers is the one every bulk mailer's help page explains: which port wants
TLS from the first byte (465) and which wants STARTTLS (587), why a provider refuses a correct password,
and what a blocked port looks like. Each failure maps to one plain-words explanation with the fix.

Invariants:
- Nothing is ever sent: the session ends with QUIT after AUTH.
- :func:`explain` is pure (a :class:`~postroom.burst.transport.SessionError` and the transport in, text
  out), so every explanation is tested without a network.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

from postroom.burst.transport import CONNECT_TIMEOUT, SessionError, Transport, open_session

GMAIL_HOSTS = ("smtp.gmail.com", "smtp.googlemail.com")
MICROSOFT_HOSTS = ("smtp.office365.com", "smtp-mail.outlook.com", "outlook.office365.com")


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    summary: str
    explanation: str = ""

    def __str__(self) -> str:
        return self.summary + (f"\n{self.explanation}" if self.explanation else "")


def _chain(exc: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def explain(err: SessionError, t: Transport) -> str:
    """The plain-words explanation and fix for a failed session."""
    chain = _chain(err.cause)
    text = " ".join(str(e) for e in chain).lower() + " " + err.detail.lower()
    where = f"{t.host}:{t.port}"
    if err.stage == "auth":
        return _explain_auth(err, t)
    if err.stage == "starttls":
        return (
            f"{where} does not offer STARTTLS, so the password and the messages would travel unencrypted. "
            "If this is port 465, it expects SSL from the first byte: use smtps://…:465. Otherwise ask the "
            "provider which port offers STARTTLS (usually 587)."
        )
    cert = next((e for e in chain if isinstance(e, ssl.SSLCertVerificationError)), None)
    if cert is not None or "certificate verify failed" in text:
        reason = cert.verify_message if cert is not None else "verification failed"
        return (
            f"The server's TLS certificate was not accepted ({reason}). If the name does not match, use the "
            "host name the certificate is for; if it is self-signed or from a private CA, add "
            "?cafile=/path/to/ca.pem to the transport URL (?verify=no only for a test server)."
        )
    if t.security == "tls" and ("wrong version number" in text or "record layer" in text or "unknown protocol" in text):
        return (
            f"{where} answered in plain text, not TLS: this port uses StartTLS. Implicit TLS (smtps://) is "
            f"for port 465; for StartTLS use smtp+starttls://{t.host}:587."
        )
    if (
        t.security != "tls"
        and err.stage in ("connect", "greeting")
        and ("timed out" in text or "timeout" in text)
        and _connected(err, chain)
    ):
        return (
            f"{where} accepted the connection but sent no greeting: it expects SSL from the first byte. "
            f"Port 465 expects SSL from the first byte; use smtps://{t.host}:465, or for StartTLS use 587."
        )
    if any(isinstance(e, socket.gaierror) for e in chain) or "name or service not known" in text:
        return f"The host name {t.host!r} does not resolve. Check the spelling of the server name."
    if any(isinstance(e, ConnectionRefusedError) for e in chain) or "refused" in text or "errno 111" in text:
        return (
            f"Nothing accepts connections on {where} (connection refused). Check host and port; "
            "submission is 587 (StartTLS) or 465 (SSL); some servers also listen on 2525."
        )
    if "timed out" in text or "timeout" in text:
        return (
            f"No answer from {where}: the port is probably blocked by a firewall or the network "
            "(many networks block port 25). Try port 587 or 2525, or 465 with smtps://."
        )
    if err.stage == "tls":
        return f"The TLS handshake failed ({err.detail}). The server may require a newer TLS version."
    return f"The session failed at {err.stage}: {err.detail}"


def _connected(err: SessionError, chain: list[BaseException]) -> bool:
    """True when the failure came after TCP connected (a read timeout, not a connect timeout)."""
    return err.stage == "greeting" or any("greeting" in str(e).lower() for e in chain)


def _explain_auth(err: SessionError, t: Transport) -> str:
    host = t.host.lower()
    detail = err.detail
    if "5.7.139" in detail or (host in MICROSOFT_HOSTS and err.code == 535 and "disabled" in detail.lower()):
        return (
            "Microsoft 365 refused with 535 5.7.139: SMTP AUTH is disabled for this tenant or mailbox. An "
            "administrator must enable 'Authenticated SMTP' for the mailbox (Microsoft 365 admin center → "
            "user → Mail → Manage email apps), and Security Defaults must allow it."
        )
    if host in GMAIL_HOSTS and err.code in (534, 535):
        return (
            f"Gmail refused the login ({err.code} {detail.strip()}). Gmail does not accept the normal account "
            "password for SMTP: turn on 2-Step Verification and create an app password "
            "(Google Account → Security → App passwords), then use that 16-letter password."
        )
    if host in MICROSOFT_HOSTS and err.code == 535:
        return (
            f"Microsoft refused the login ({err.code} {detail.strip()}). Check the password; with multi-factor "
            "authentication an app password is needed, and SMTP AUTH must be enabled for the mailbox."
        )
    if "without tls" in detail.lower():
        return "Refusing to send the password in plain text to a remote server: use smtp+starttls:// or smtps://."
    if "no auth" in detail.lower():
        return (
            f"{t.host} offers no AUTH on this connection. Many servers offer AUTH only after TLS or only on "
            "the submission port 587."
        )
    if err.code == 535:
        return f"The server refused the user name or password ({err.code} {detail.strip()})."
    return f"Authentication failed ({err.code} {detail.strip()})."


async def check(t: Transport, password: str | None, *, timeout: float = CONNECT_TIMEOUT) -> CheckResult:
    """Run the connection check; never raises for network or protocol trouble."""
    try:
        client = await open_session(t, password, timeout=timeout)
    except SessionError as err:
        return CheckResult(False, f"FAILED: {t} ({err.stage}: {err.detail})", explain(err, t))
    tls = f"TLS {client.tls_info}".strip() if client.is_tls else "no TLS"
    auth = f", authenticated as {t.user}" if t.user else ", no authentication"
    await client.quit()
    return CheckResult(True, f"OK: {t} ({tls}{auth}); nothing was sent")
