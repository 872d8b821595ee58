"""Device credentials from the command line, end to end: `devices reset`, `devices certificates`,
`devices attach-cert`, `devices list --expiring` and `devices enroll --renew` (renewal over MQTT)
against a real `gateway serve`, with Mosquitto's own client as the device (DESIGN.md §5-§7).

One gateway serves the module; each test uses its own devices. The commands whose output is
checked run as `python -m gateway` subprocesses; set-up steps run the same Typer app in this
process (`InProcess`), which is faster.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ca
from tests.integration.processes import (
    ROOT,
    Cli,
    Gateway,
    InProcess,
    Processes,
    base_env,
    crl_serials,
    hold_connection,
    is_event,
    mode,
    publish,
    start_gateway,
)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    processes = Processes()
    try:
        yield start_gateway(processes, tmp_path_factory.mktemp("credentials"))
    finally:
        processes.stop_all()


@pytest.fixture(scope="module")
def fast(gw: Gateway) -> InProcess:
    return InProcess.beside(gw)


@pytest.fixture
def processes() -> Iterator[Processes]:
    children = Processes()
    try:
        yield children
    finally:
        children.stop_all()


def connects(gw: Gateway, creds: str, device_id: str) -> bool:
    """Whether `mosquitto_pub` with these credentials gets a reading acknowledged."""
    code, output = publish(gw, Path(creds), device_id)
    return code == 0 and "received PUBACK" in output


def refused_at_tls(gw: Gateway, creds: str, device_id: str) -> bool:
    """Whether the gateway refuses these credentials in the TLS handshake, before any MQTT."""
    code, output = publish(gw, Path(creds), device_id)
    return code != 0 and "received CONNACK" not in output


def enroll(fast: InProcess, gw: Gateway, device_id: str, out: str) -> Any:
    """Register `device_id` and enroll it into `out` (in the gateway's directory); the summary."""
    token = fast.json("devices", "register", device_id.title(), "--id", device_id)["registration_token"]
    return fast.json("devices", "enroll", "--token", token, "--out", str(gw.cli.cwd / out))


def serial_of(path: Path) -> str:
    return format(ca.load_certificate(path.read_bytes()).serial_number, "x")


def test_reset_keeps_certificates_until_the_device_enrolls_again(gw: Gateway, fast: InProcess) -> None:
    """Without --revoke-existing the old certificate works until the new token is enrolled."""
    old = enroll(fast, gw, "keep-1", "keep")
    assert connects(gw, "keep", "keep-1")
    reset = gw.cli.json("devices", "reset", "keep-1")
    assert set(reset) == {"id", "name", "status", "registration_token", "token_expires_at"}
    assert (reset["id"], reset["status"]) == ("keep-1", "active")
    assert connects(gw, "keep", "keep-1"), "the old certificate still works after a plain reset"
    table = fast("devices", "reset", "keep-1")
    assert table.exit_code == 0, table.output
    token = table.stdout.splitlines()[2].strip()
    assert f"gateway devices enroll --token {token} --out DIR" in table.stdout
    stale_token, stale_dir = reset["registration_token"], str(gw.cli.cwd / "keep-stale")
    stale = fast.fails("devices", "enroll", "--token", stale_token, "--out", stale_dir)
    assert "registration token has expired" in stale, "a newer reset voids the older token"

    new = fast.json("devices", "enroll", "--token", token, "--out", str(gw.cli.cwd / "keep-new"))
    assert new["certificate_serial"] != old["certificate_serial"]
    assert int(old["certificate_serial"], 16) in crl_serials(gw.cli.cwd / "certs")
    assert refused_at_tls(gw, "keep", "keep-1"), "enrolling the new token revoked the old certificate"
    assert connects(gw, "keep-new", "keep-1")


def test_reset_with_revoke_existing_cuts_the_device_off_at_once(
    gw: Gateway, fast: InProcess, processes: Processes
) -> None:
    """--revoke-existing revokes the certificate and cuts the live session; the new token enrolls."""
    enroll(fast, gw, "cut-1", "cut")
    held = hold_connection(processes, gw, Path("cut"), "cut-1")
    at = gw.log.mark()
    reset = gw.cli.json("devices", "reset", "cut-1", "--revoke-existing")
    gw.log.wait_for(is_event("presence.offline", device_id="cut-1", reason="revoked"), "cut-1 cut", since=at)
    assert held.proc.wait(timeout=10) != 0
    assert refused_at_tls(gw, "cut", "cut-1")
    token = reset["registration_token"]
    fast.json("devices", "enroll", "--token", token, "--out", str(gw.cli.cwd / "cut-new"))
    assert connects(gw, "cut-new", "cut-1")


def test_enroll_renew_over_mqtt(gw: Gateway, fast: InProcess) -> None:
    """`enroll --renew` swaps in a new pair over MQTT; the new one connects and the old is refused."""
    creds = gw.cli.cwd / "renew"
    enrolled = enroll(fast, gw, "renew-1", "renew")
    shutil.copytree(creds, gw.cli.cwd / "renew-old")
    files = ("device.key", "device.crt", "ca.crt")
    renewed = gw.cli.json("devices", "enroll", "--renew", "--out", "renew")
    assert set(renewed) == {"id", "certificate_serial", "not_after"}
    assert renewed["id"] == "renew-1"
    assert renewed["certificate_serial"] not in (enrolled["certificate_serial"], None)
    assert serial_of(creds / "device.crt") == renewed["certificate_serial"]
    assert (creds / "device.key").read_bytes() != (gw.cli.cwd / "renew-old" / "device.key").read_bytes()
    assert mode(creds / "device.key") == 0o600
    assert sorted(p.name for p in creds.iterdir()) == sorted(files), "the *.previous pair is gone"

    assert refused_at_tls(gw, "renew-old", "renew-1"), "the renewed certificate's first use revoked the old"
    assert connects(gw, "renew", "renew-1")

    # Again at once: the gateway's rate limit (ca.renew_min_interval_s, 60 s) rejects it with
    # its code and message, and nothing in the directory changes.
    before = {name: (creds / name).read_bytes() for name in files}
    error = fast.fails("devices", "enroll", "--renew", "--out", str(creds))
    assert error.startswith("error: the gateway refused the renewal: the last renewal was"), error
    assert error.endswith("[rate_limited]"), error
    assert {name: (creds / name).read_bytes() for name in files} == before
    assert sorted(p.name for p in creds.iterdir()) == sorted(files)

    listed = gw.cli.json("devices", "certificates", "renew-1")["data"]
    assert [c["serial"] for c in listed] == [enrolled["certificate_serial"], renewed["certificate_serial"]]
    old, new = listed
    assert old["first_used_at"], "the renewal session was the old certificate's first use"
    assert old["revoked_at"] and old["renews"] is None
    assert new["first_used_at"] and new["revoked_at"] is None
    assert new["renews"] == old["serial"]
    assert {c["source"] for c in listed} == {"issued"}
    table = fast("devices", "certificates", "renew-1")
    assert table.exit_code == 0, table.output
    header, first, second, count = table.stdout.splitlines()
    assert header.split() == ["SERIAL", "SOURCE", "NOT", "AFTER", "FIRST", "USED", "REVOKED", "RENEWS"]
    assert second.split()[0] == new["serial"] and second.split()[-1] == old["serial"]
    assert first.split()[-1] == "-"
    assert count == "2 certificate(s)"


def test_list_expiring(gw: Gateway, fast: InProcess) -> None:
    """`list --expiring` lists a 365-day certificate within 400 days, not within 30 days."""
    enroll(fast, gw, "expiry-1", "expiry")
    assert "expiry-1" not in {d["id"] for d in fast.json("devices", "list", "--expiring", "30d")["data"]}
    within = gw.cli.json("devices", "list", "--expiring", "400d", "--search", "expiry")
    assert [d["id"] for d in within["data"]] == ["expiry-1"]
    assert within["total"] == 1
    table = fast("devices", "list", "--expiring", "400d", "--search", "expiry")
    assert table.exit_code == 0, table.output
    header, row, _ = table.stdout.splitlines()
    assert header.split()[-2:] == ["CERT", "EXPIRES"]
    assert row.split()[-1] == within["data"][0]["certificate"]["not_after"]
    assert "invalid duration 'soon'" in fast.fails("devices", "list", "--expiring", "soon")


def test_attach_cert_without_an_external_ca_is_refused(gw: Gateway, fast: InProcess) -> None:
    """`attach-cert` fails clearly when no external CA is configured, and when the file is missing."""
    enroll(fast, gw, "vendor-1", "vendor")
    error = gw.cli.fails("devices", "attach-cert", "vendor-1", "--cert", "vendor/device.crt")
    assert error.startswith("error: no external CA is configured (ca.external_anchors)"), error
    assert error.endswith("[no_external_ca]")
    missing = fast.fails("devices", "attach-cert", "vendor-1", "--cert", "nope.pem")
    assert missing.startswith("error: cannot read the certificate nope.pem"), missing
    assert len(fast.json("devices", "certificates", "vendor-1")["data"]) == 1


def test_enroll_renew_fails_clearly(gw: Gateway, fast: InProcess, tmp_path: Path) -> None:
    """Missing files, a token beside --renew, no listener and a silent listener each give one error."""
    renew = ("devices", "enroll", "--renew", "--out")
    assert f"{tmp_path} lacks device.key, device.crt, ca.crt" in fast.fails(*renew, str(tmp_path))
    assert "drop --token" in fast.fails(*renew, str(tmp_path), "--token", "x")
    enroll(fast, gw, "silent-1", "silent")
    creds = str(gw.cli.cwd / "silent")
    with socket.socket() as silent:  # accepts TCP (backlog) but never speaks TLS
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = str(silent.getsockname()[1])
        error = fast.fails(*renew, creds, "--port", port, "--timeout", "0.5")
        assert error == f"error: no MQTT session with the gateway at 127.0.0.1:{port} within 0.5 s"
    error = gw.cli.fails(*renew, creds, "--port", port)
    assert error.startswith(f"error: cannot reach the gateway's MQTT listener at 127.0.0.1:{port}")


def test_client_commands_leave_the_service_unloaded(tmp_path: Path) -> None:
    """Importing the CLI loads no FastAPI, uvicorn, SQLAlchemy or amqtt (they cost ~1.5 s of start-up)."""
    heavy = ["fastapi", "uvicorn", "sqlalchemy", "amqtt", "gateway.app"]
    probe = f"import sys, gateway.cli.main; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert result.stdout.strip() == "", f"loaded at import: {result.stdout}"
    help_text = Cli(tmp_path, {**base_env(), "COLUMNS": "200"})("--help").stdout
    assert "(default: config/gateway.toml when present)" in help_text
