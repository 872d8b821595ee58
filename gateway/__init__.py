"""MQTT device gateway with mutual TLS.

Devices connect over MQTT 3.1.1 with client certificates issued by the gateway's own
CA; the gateway maps each certificate to a device record, admits or refuses the
session, keeps presence durable and ordered, enforces per-device topic ACLs, and lets
operators manage devices over an HTTPS API and a CLI. See DESIGN.md for the contract.
"""

__version__ = "0.1.0"
