"""``gateway operators issue``: operator client certificates for MQTT (status, events, device data).

Works on the local CA and database (the CA key never leaves the gateway's machine):
run it where the gateway's certs and data directories are.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer

import ca
from ca import files as ca_files
from gateway.cli.common import fails_cleanly, print_json, settings_from
from gateway.config import Settings
from gateway.core.admission import CertificateKind
from gateway.core.clock import iso, utcnow
from gateway.core.ids import OperatorName

app = typer.Typer(help="Operator certificates for MQTT.", no_args_is_help=True)


@dataclass(frozen=True)
class IssuedOperator:
    name: str
    serial: str
    not_after: str
    key_path: Path
    cert_path: Path
    ca_path: Path


async def issue_operator(settings: Settings, name: str, out: Path) -> IssuedOperator:
    """Make a key, issue and record an operator certificate, write the three files into `out`."""
    # Imported here, not at the top: the store (SQLAlchemy) would slow down every command's start-up.
    from gateway.pki import Pki, PkiPaths  # noqa: PLC0415 - start-up time, see above
    from gateway.store import Store  # noqa: PLC0415 - start-up time, see above

    operator = OperatorName(name)
    pki = Pki.load(PkiPaths(settings.paths.certs_dir))
    key = ca.generate_key()
    now = utcnow()
    cert = pki.issue(
        key.public_key(),
        subject=operator.value,
        kind=CertificateKind.OPERATOR,
        now=now,
        validity=timedelta(days=settings.ca.operator_validity_days),
    )
    store = Store(settings.database_url, busy_timeout_s=settings.database.busy_timeout_s)
    try:
        await store.create_schema()
        await store.credentials.add_certificate(cert, now)
    finally:
        await store.close()
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - a few small files; nothing else waits on this loop
    paths = (out / "operator.key", out / "operator.crt", out / "ca.crt")
    ca_files.write_private_key(paths[0], key, overwrite=True)
    ca_files.write_public(paths[1], cert.pem.encode("ascii"))
    ca_files.write_public(paths[2], pki.ca_pem)
    return IssuedOperator(operator.value, cert.serial, iso(cert.not_after) or "", *paths)


@app.command()
@fails_cleanly
def issue(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Operator name (letters, digits, . _ -).")],
    out: Annotated[
        Path, typer.Option("--out", help="Directory for operator.key, operator.crt, ca.crt.", file_okay=False)
    ],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Issue an operator certificate: it may subscribe to gateway/# and devices/+/{readings,health,info}.

    Example: gateway operators issue alice --out ./alice
    then: mosquitto_sub --cafile alice/ca.crt --cert alice/operator.crt --key alice/operator.key \\
          -h localhost -p 8883 -t 'gateway/#' -v
    """
    issued = asyncio.run(issue_operator(settings_from(ctx), name, out))
    if json_out:
        print_json(
            {
                "name": issued.name,
                "certificate_serial": issued.serial,
                "not_after": issued.not_after,
                "key": str(issued.key_path),
                "certificate": str(issued.cert_path),
                "ca": str(issued.ca_path),
            }
        )
        return
    typer.echo(
        f"issued operator certificate {issued.serial} for {issued.name}, valid until {issued.not_after}"
    )
    typer.echo(f"  key  {issued.key_path} (0600)\n  cert {issued.cert_path}\n  ca   {issued.ca_path}")
