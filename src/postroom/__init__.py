"""Postroom: one system that carries an email the whole way.

PDF burst → SMTP submission → durable store and relay queue → POP3 / IMAP.
"""

__version__ = "0.1.0"
