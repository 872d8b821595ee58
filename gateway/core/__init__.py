"""The pure core: rules over values, no I/O, no asyncio, no third-party frameworks.

Everything here is tested in memory. The async shell (listener, broker adapter,
store, API) calls into these modules and never re-checks what they decided.
"""
