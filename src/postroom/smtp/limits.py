"""Named SMTP limits and timeouts, each with its source. Overridable under ``[smtp]`` in the config."""

from __future__ import annotations

from dataclasses import dataclass

MAX_COMMAND_LINE = 512  # octets incl. CRLF, RFC 5321 §4.5.3.1.4
MAX_TEXT_LINE = 1000  # octets incl. CRLF, RFC 5321 §4.5.3.1.6
MAX_RECIPIENTS = 100  # RFC 5321 §4.5.3.1.8 requires accepting at least 100
MAX_MESSAGE_SIZE = 50 * 1024 * 1024  # octets, advertised with SIZE (RFC 1870)
MAX_ERRORS = 10  # bad commands before 421 and close (Postfix smtpd_hard_error_limit is 20)
COMMAND_TIMEOUT = 300.0  # seconds, RFC 5321 §4.5.3.2.7 (server timeout 5 minutes)
DATA_TIMEOUT = 600.0  # seconds for the whole DATA/BDAT phase without progress, RFC 5321 §4.5.3.2.6


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """``[smtp]``: limits of the SMTP server (MX and submission alike)."""

    max_command_line: int = MAX_COMMAND_LINE
    max_text_line: int = MAX_TEXT_LINE
    max_recipients: int = MAX_RECIPIENTS
    max_message_size: int = MAX_MESSAGE_SIZE
    max_errors: int = MAX_ERRORS
    command_timeout: float = COMMAND_TIMEOUT
    data_timeout: float = DATA_TIMEOUT
    reject_bare_lf: bool = True  # SMTP smuggling defence: bare LF/CR in DATA gets 550 5.6.11
