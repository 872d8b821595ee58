"""Stock amqtt 0.12.1, as a naive integrator would run it: the baseline of `bench/ingest`.

Runs `amqtt.broker.Broker` with its own TLS listener (the gateway's CA, server certificate
and key; amqtt hard-codes ``CERT_OPTIONAL``, so the devices' certificates are checked when
sent but not required), anonymous authentication, and, with ``--db``, a plain plugin that
stores each received message in SQLite from ``on_broker_message_received``: one transaction
per message, one row per reading (a JSON object or an array of them), with the gateway's
durability settings (WAL, ``synchronous=FULL``). amqtt sends the PUBACK before any plugin
sees the message, so what this baseline acknowledges is not stored yet (AMQTT-NOTES gap 7).

Prints ``ready <port>`` on stdout once listening; stops on SIGTERM/SIGINT.

    python bench/stock_amqtt.py --certs DIR [--db FILE] [--port N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.broker import Broker
from amqtt.plugins.base import BasePlugin

SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    sensor TEXT,
    value REAL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_readings_device_ts ON readings (device_id, received_at);
"""


class StorePlugin(BasePlugin[Any]):
    """One SQLite transaction per received message, in the broker's event loop."""

    @dataclass
    class Config:
        db: str

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.conn = sqlite3.connect(self.config.db)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(SCHEMA)

    async def on_broker_message_received(self, *, client_id: str, message: Any) -> None:
        if message is None or not message.topic.endswith("/readings"):
            return
        try:
            data = json.loads(bytes(message.data))
        except ValueError:
            return
        items = data if isinstance(data, list) else [data]
        now = time.time()
        rows = [
            (client_id, message.topic, item.get("sensor"), item.get("value"), now)
            for item in items
            if isinstance(item, dict)
        ]
        with self.conn:  # one transaction, committed here
            self.conn.executemany(
                "INSERT INTO readings (device_id, topic, sensor, value, received_at) VALUES (?, ?, ?, ?, ?)",
                rows,
            )

    async def close(self) -> None:
        self.conn.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def serve(certs: Path, db: Path | None, port: int) -> None:
    plugins: dict[str, Any] = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
    if db is not None:
        plugins[f"{__name__}.StorePlugin"] = {"db": str(db)}
    broker = Broker(
        {
            "listeners": {
                "default": {
                    "type": "tcp",
                    "bind": f"127.0.0.1:{port}",
                    "ssl": True,
                    "cafile": str(certs / "ca.crt"),
                    "certfile": str(certs / "server.crt"),
                    "keyfile": str(certs / "server.key"),
                }
            },
            "plugins": plugins,
        }
    )
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready {port}", flush=True)
    await stop.wait()
    await broker.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--certs", type=Path, required=True, help="folder with ca.crt, server.crt, server.key"
    )
    parser.add_argument("--db", type=Path, help="SQLite file to store readings in (omit: store nothing)")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0: a free one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # amqtt logs every refused/lost client at ERROR
    asyncio.run(serve(args.certs, args.db, args.port or free_port()))


if __name__ == "__main__":
    main()
