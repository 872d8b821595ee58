"""amqtt 0.12.1 behind one package: the MQTT engine, with the gaps the gateway must close.

Receives connections whose TLS handshake our listener has completed (an asyncio
reader/writer pair); hands on, through `SessionHooks`, an admission request per
CONNECT, a start and an end per admitted session, and every PUBLISH that passed the
ACL. Each fix below names its gap in AMQTT-NOTES.md
and has a regression test in tests/integration/test_broker_gaps.py:

 1. our own TLS listener (`gateway.listener`) feeds the ``external`` listener;
 2. keep-alive is enforced: no packet for 1.5 x keep-alive closes the session;
 3. admission runs right after CONNECT is parsed, before any session bookkeeping:
    a refused CONNECT creates, deletes and keeps nothing;
 4. take-over closes the old connection first; its end never marks the device offline;
 5. retained messages go only to the session's own subscriptions, through the ACL;
 6. a bad PUBLISH runs the normal disconnect flow (no zombie sessions);
 7. each inbound PUBLISH is handled inline by the reader (a full ingest queue stops
    reading the socket) and acknowledged only once the gateway has committed it;
 8. no plugin hooks: the hooks are awaited in order, their exceptions logged;
 9. an exception during admission refuses with CONNACK 3 instead of hanging;
10. `kick` closes a live session through the normal disconnect flow;
11. every packet is framed with a size limit and checked by `gateway.core.wire`
    before amqtt parses it; violations close the connection;
12. delivery QoS is min(publish QoS, granted QoS).

Inside: `session` (what the rest of the gateway sees: `Peer`, `LiveSession`,
`SessionHooks`; no amqtt), `frames` (packets out of the byte stream, with the
keep-alive clock and fairness; no amqtt), `traffic` (bytes and messages of a connection,
counted on its streams; no amqtt), `handler` (one connection: the reader loop
and commit-gated acknowledgements), `engine` (amqtt's Broker with the gateway's connection
flow, and `MqttEngine`, its face to the gateway). Only this package imports amqtt.
"""

from gateway.broker.engine import MqttEngine
from gateway.broker.session import LiveSession, Peer, SessionHooks

__all__ = ["LiveSession", "MqttEngine", "Peer", "SessionHooks"]
