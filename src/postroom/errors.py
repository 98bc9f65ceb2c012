"""The one exception tree of Postroom.

Invariants:
- Every exception Postroom raises on purpose derives from :class:`PostroomError`.
- Protocol errors say who broke the protocol: :class:`LocalProtocolError` (we did) or
  :class:`RemoteProtocolError` (the peer did). Sans-I/O cores raise only the latter for bad input.
- :class:`ReplyError` carries the wire code and enhanced status code; each protocol turns it into a reply
  at exactly one place.
- Delivery errors split :class:`TransientDeliveryError` (4xx: retry) and :class:`PermanentDeliveryError`
  (5xx: bounce).
"""

from __future__ import annotations


class PostroomError(Exception):
    """Root of every error Postroom raises on purpose."""


class ConfigError(PostroomError):
    """The configuration is invalid. The message names the file and the key."""


class StoreError(PostroomError):
    """The mail store could not do what was asked."""


class StoreFullError(StoreError):
    """The disk is full or a quota was reached (SMTP 452, IMAP NO [OVERQUOTA])."""


class NotFoundError(StoreError):
    """A mailbox, message or account does not exist."""


class AlreadyExistsError(StoreError):
    """A mailbox or account of that name exists already."""


class ProtocolError(PostroomError):
    """Somebody broke a protocol."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""


class ReplyError(PostroomError):
    """An error with a wire reply: ``code`` (e.g. 550), ``enhanced`` (e.g. "5.1.1") and text."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text


class DeliveryError(PostroomError):
    """A message could not be delivered to a recipient."""

    def __init__(self, message: str, *, code: int = 0, enhanced: str = "", remote: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.enhanced = enhanced
        self.remote = remote


class TransientDeliveryError(DeliveryError):
    """4xx or a connection failure: try again later."""


class PermanentDeliveryError(DeliveryError):
    """5xx: do not retry, send a bounce."""


class AuthError(PostroomError):
    """Authentication failed. Deliberately carries no reason that could tell users apart."""
