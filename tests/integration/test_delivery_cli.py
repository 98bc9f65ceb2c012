"""``postroom queue list|retry|delete`` and ``postroom dkim keygen`` on a real store (in-process CLI)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from postroom.cli import main
from postroom.config import load
from postroom.store.api import OutboundEnvelope, OutboundRecipient
from postroom.store.sqlite import open_store


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "postroom.toml"
    path.write_text(f'hostname = "mx.a.test"\ndata_dir = "{tmp_path / "var"}"\ndomains = ["a.test"]\n')
    return path


def queue_two(config_file: Path) -> None:
    cfg = load(config_file)

    async def work() -> None:
        store = open_store(cfg.store_url)
        await store.open()
        env = OutboundEnvelope(
            "alice@a.test", (OutboundRecipient("bob@b.test"), OutboundRecipient("carol@c.test", notify="NEVER"))
        )
        await store.append(b"Subject: q\r\n\r\nbody\r\n", [], outbound=env)
        (first, _second) = await store.queue_due(1e12)
        await store.queue_update(first.id, "deferred", "451 4.4.1 try later", 2e12)
        await store.close()

    asyncio.run(work())


def test_queue_list_retry_delete(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ["--config", str(config_file)]
    assert main(["queue", "list", *cfg]) == 0
    assert "queue is empty" in capsys.readouterr().out
    queue_two(config_file)
    assert main(["queue", "list", *cfg]) == 0
    out = capsys.readouterr().out
    assert "<alice@a.test> -> <bob@b.test>" in out and "deferred" in out and "451 4.4.1 try later" in out
    assert main(["queue", "list", "--json", *cfg]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["recipient"] for r in rows) == ["bob@b.test", "carol@c.test"]
    deferred = next(r for r in rows if r["status"] == "deferred")
    assert deferred["next_attempt"] == 2e12
    assert main(["queue", "retry", str(deferred["id"]), *cfg]) == 0
    assert "1 queue entry due now" in capsys.readouterr().out
    assert main(["queue", "list", "--json", *cfg]) == 0
    assert all(r["next_attempt"] < 2e12 for r in json.loads(capsys.readouterr().out))
    assert main(["queue", "delete", str(deferred["id"]), *cfg]) == 0
    assert "1 queue entry deleted" in capsys.readouterr().out
    assert main(["queue", "list", "--json", *cfg]) == 0
    assert [r["recipient"] for r in json.loads(capsys.readouterr().out)] == ["carol@c.test"]
    assert main(["queue", "delete", "999999", *cfg]) == 1
    assert main(["queue", "delete", "x", *cfg]) == 1
    assert "queue ids are numbers" in capsys.readouterr().err


def test_dkim_keygen_prints_the_records(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dkim", "keygen", "A.test.", "--config", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert 'postroom-rsa._domainkey.a.test. 3600 IN TXT "v=DKIM1; k=rsa; p=' in out
    assert 'postroom-ed25519._domainkey.a.test. 3600 IN TXT "v=DKIM1; k=ed25519; p=' in out
    for line in out.splitlines():
        for part in line.split('"')[1::2]:
            assert len(part) <= 255  # DNS character-strings
    keydir = config_file.parent / "var" / "dkim" / "a.test"
    assert sorted(p.name for p in keydir.iterdir()) == ["postroom-ed25519.key", "postroom-rsa.pem"]
    assert main(["dkim", "show", "a.test", "--config", str(config_file)]) == 0
    assert capsys.readouterr().out == out  # same keys, same records
    assert main(["dkim", "show", "other.test", "--config", str(config_file)]) == 1
