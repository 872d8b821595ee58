"""`gateway devices history` and `gateway connect-failures [approve]` end to end: a real `gateway
serve` with an external CA configured, Mosquitto's own client as the device (DESIGN.md §5).

One gateway serves the module. The commands whose exit status and output are checked run as
`python -m gateway` subprocesses; the rest run the same Typer app in this process (`InProcess`).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

import ca
from ca import files as ca_files
from gateway.core.clock import utcnow
from tests.integration.processes import Gateway, InProcess, Processes, publish, start_gateway

VENDOR = "vendor"  # the external CA's folder in the gateway's directory


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """`gateway serve` whose config/gateway.toml trusts an external CA (ca.external_anchors)."""
    root = tmp_path_factory.mktemp("history")
    authority = ca.create_authority(now=utcnow(), common_name="Vendor Devices CA")
    (root / VENDOR).mkdir()
    (root / VENDOR / "ca.crt").write_bytes(authority.certificate_pem)
    crl = ca.build_crl(authority, [], now=utcnow(), crl_number=1)
    (root / VENDOR / "crl.pem").write_bytes(ca.crl_pem(crl))
    ca_files.write_private_key(root / VENDOR / "ca.key", authority.key)
    (root / "config").mkdir()
    anchor = f'{{ cert = "{root / VENDOR / "ca.crt"}", crl = "{root / VENDOR / "crl.pem"}" }}'
    (root / "config" / "gateway.toml").write_text(f"[ca]\nexternal_anchors = [{anchor}]\n")
    processes = Processes()
    try:
        yield start_gateway(processes, root)
    finally:
        processes.stop_all()


@pytest.fixture(scope="module")
def fast(gw: Gateway) -> InProcess:
    return InProcess.beside(gw)


def vendor_device(gw: Gateway, folder: str) -> str:
    """A key and certificate of the external CA, in `folder` as Mosquitto wants them; its fingerprint."""
    root = gw.cli.cwd
    authority = ca_files.load_authority(root / VENDOR / "ca.crt", root / VENDOR / "ca.key")
    key = ca.generate_key()
    cert = ca.issue_client_certificate(
        authority, key.public_key(), subject_id=f"hw-{folder}", kind="device", now=utcnow(),
        validity=timedelta(days=30),
    )  # fmt: skip
    (root / folder).mkdir()
    ca_files.write_private_key(root / folder / "device.key", key)
    (root / folder / "device.crt").write_bytes(ca.certificate_pem(cert))
    shutil.copy(root / "certs" / "ca.crt", root / folder / "ca.crt")
    return ca.fingerprint_sha256(cert)


def test_an_unknown_certificate_is_listed_approved_and_its_device_connects(
    gw: Gateway, fast: InProcess
) -> None:
    """connect-failures lists the refusal; approve creates the device; it then publishes and its
    session shows in devices history, as JSON and as a table."""
    fingerprint = vendor_device(gw, "pump-1")
    code, output = publish(gw, Path("pump-1"), "pump-1")
    assert code != 0 and "not authorised" in output.lower(), output

    listed = gw.cli.json("connect-failures")
    [row] = [r for r in listed["data"] if r["fingerprint"] == fingerprint]
    assert (row["reason"], row["count"], row["approvable"]) == ("unknown_certificate", 1, True)
    assert row["last_client_id"] == "pump-1"
    table = gw.cli("connect-failures")
    assert table.returncode == 0, table.stderr
    assert fingerprint in table.stdout and "approvable (O=device,CN=hw-pump-1)" in table.stdout

    device = gw.cli.json("connect-failures", "approve", fingerprint, "--name", "Pump 1", "--id", "pump-1")
    assert (device["id"], device["status"]) == ("pump-1", "pending")
    assert device["certificate"]["fingerprint_sha256"] == fingerprint
    again = gw.cli.fails("connect-failures", "approve", fingerprint, "--name", "Pump 1")
    assert "[already_approved]" in again

    code, output = publish(gw, Path("pump-1"), "pump-1")
    assert code == 0 and "received PUBACK" in output, output
    history = gw.cli.json("devices", "history", "pump-1")
    [session] = history["data"]
    assert (session["epoch"], session["reason"], session["messages_in"]) == (1, "client_disconnect", 1)
    assert session["certificate_serial"] == device["certificate"]["serial"]
    shown = fast("devices", "history", "pump-1")
    assert shown.exit_code == 0, shown.output
    assert "client_disconnect" in shown.stdout and "MSG IN" in shown.stdout.splitlines()[0]
    assert fast.json("connect-failures", "--reason", "unknown_certificate")["data"][0]["approved_device_id"]


def test_the_commands_fail_clearly(gw: Gateway, fast: InProcess) -> None:
    """An unknown device, a fingerprint never refused, a malformed one: one error line, exit 1."""
    assert "[device_not_found]" in gw.cli.fails("devices", "history", "nobody")
    assert "[failure_not_found]" in fast.fails("connect-failures", "approve", "ab" * 32, "--name", "x")
    assert "[invalid_fingerprint]" in fast.fails("connect-failures", "approve", "xyz", "--name", "x")
    empty = fast("devices", "history", fast.json("devices", "register", "Quiet", "--id", "quiet-1")["id"])
    assert empty.exit_code == 0 and "quiet-1 has no recorded sessions" in empty.stdout
