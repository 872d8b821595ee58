"""Integration tests: real brokers and processes on loopback."""
