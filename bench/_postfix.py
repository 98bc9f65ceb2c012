"""The private Postfix instances the benchmarks (and the Postfix interop test) run: their service table.

Each instance gets its own ``etc/master.cf``: one ``inet`` line for its smtpd on 127.0.0.1 (written by the
caller, which knows its port and options) followed by :data:`SERVICES`, the internal services of Debian's
stock ``master.cf`` (Postfix 3.7), with ``chroot`` off so that the instance runs from a temporary
directory. Services an instance never uses (``local`` for a relay-only instance) cost nothing: the master
starts a service only when something asks for it.
"""

SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def master_cf(smtpd_line: str) -> str:
    """``master.cf`` for one instance: its smtpd line (e.g. ``127.0.0.1:2525 inet n - n - - smtpd``), then
    the internal services."""
    return smtpd_line.rstrip("\n") + "\n" + SERVICES
