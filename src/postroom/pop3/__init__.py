"""POP3 server: RFC 1939 with CAPA (RFC 2449), STLS (RFC 2595) and AUTH (RFC 5034).

``core`` is the sans-I/O session (state table AUTHORIZATION → TRANSACTION → UPDATE), ``parser`` and
``framing`` its pure helpers, ``events`` what it asks of the outside world, ``maildrop`` the listing fixed
at login, ``lock`` the cross-process maildrop lock and ``adapter`` the asyncio glue
(``handle(conn, app, spec)``). See docs/pop3.md.
"""
