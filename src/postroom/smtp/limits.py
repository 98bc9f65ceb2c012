"""Named SMTP limits and timeouts, each with its source. Overridable under ``[smtp]`` in the config."""

from __future__ import annotations

from dataclasses import dataclass

MAX_COMMAND_LINE = 512  # octets incl. CRLF, RFC 5321 §4.5.3.1.4 (MAIL/RCPT may add 1000 for parameters)
MAX_TEXT_LINE = 1000  # octets incl. CRLF, RFC 5321 §4.5.3.1.6
MAX_RECIPIENTS = 100  # RFC 5321 §4.5.3.1.8 requires accepting at least 100
MAX_MESSAGE_SIZE = 50 * 1024 * 1024  # octets, advertised with SIZE (RFC 1870)
MAX_RECEIVED = 100  # Received: fields a message may already carry, RFC 5321 §6.3 ("normally at least 100")
MAX_ERRORS = 10  # 5xx replies before 421 and close (Postfix smtpd_hard_error_limit is 20)
COMMAND_TIMEOUT = 300.0  # seconds for one command line to arrive, RFC 5321 §4.5.3.2.7 (5 minutes)
DATA_TIMEOUT = 600.0  # seconds without any progress while receiving DATA/BDAT, RFC 5321 §4.5.3.2.6
DATA_DEADLINE = 3600.0  # seconds for one whole message transfer, however it trickles in (slowloris bound)


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """``[smtp]``: limits of the SMTP server (MX and submission alike).

    Bare CR or LF in DATA is always refused with ``550 5.6.11`` (SMTP smuggling defence); there is no
    setting to allow it.
    """

    max_command_line: int = MAX_COMMAND_LINE
    max_text_line: int = MAX_TEXT_LINE
    max_recipients: int = MAX_RECIPIENTS
    max_message_size: int = MAX_MESSAGE_SIZE
    max_received: int = MAX_RECEIVED  # mail-loop detection; 0: no limit
    max_errors: int = MAX_ERRORS
    command_timeout: float = COMMAND_TIMEOUT
    data_timeout: float = DATA_TIMEOUT
    data_deadline: float = DATA_DEADLINE
