"""What the records operators keep beside devices (groups, sites, profiles) have in common.

Receives raw ids and names (from a request body, a path, a CLI argument); hands on a
`RecordId` (validated once) or a clean name, or raises `InvalidValue`:

- ids follow the device id grammar (``^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$``, the one rule in
  `ca.SUBJECT_ID_PATTERN`): they appear in URL paths and in device fields (``location_ids``,
  ``profile_id``), so nothing needs escaping; an operator chooses one or the gateway makes
  one, a prefix (``grp_``, ``site_``, ``prof_``) and 16 random base32 characters;
- names are 1-`NAME_MAX` printable characters, surrounding spaces dropped (as device names).
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass

from ca import SUBJECT_ID_PATTERN
from gateway.errors import InvalidValue

NAME_MAX = 200
# The kinds of record, their id prefix when generated, and their word in messages and codes.
PREFIXES = {"group": "grp_", "site": "site_", "profile": "prof_"}


@dataclass(frozen=True, slots=True)
class RecordId:
    """The id of a group, site or profile (`kind`): the device id grammar."""

    kind: str
    value: str

    def __post_init__(self) -> None:
        if self.kind not in PREFIXES:
            raise ValueError(f"unknown record kind {self.kind!r}")  # a bug, never input
        if not isinstance(self.value, str) or not SUBJECT_ID_PATTERN.fullmatch(self.value):
            raise InvalidValue(
                f"invalid {self.kind} id {self.value!r}: 1-64 characters from A-Z a-z 0-9 . _ -, "
                "starting with a letter or digit",
                code=f"invalid_{self.kind}_id",
            )

    @classmethod
    def generate(cls, kind: str) -> RecordId:
        """A fresh random id: the kind's prefix and 16 base32 characters (80 bits)."""
        raw = base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()
        return cls(kind, PREFIXES[kind] + raw)

    @classmethod
    def chosen_or_new(cls, kind: str, raw: str | None) -> RecordId:
        """The operator's id, or a generated one when none (or an empty one) was given."""
        return cls.generate(kind) if raw is None or raw == "" else cls(kind, raw)

    def __str__(self) -> str:
        return self.value


def _unprintable(ch: str) -> bool:
    return ord(ch) < 0x20 or ord(ch) == 0x7F or 0xD800 <= ord(ch) <= 0xDFFF


def parse_name(raw: object, kind: str) -> str:
    """A record's name: 1-200 printable characters, stripped (lone surrogates are not text)."""
    name = raw.strip() if isinstance(raw, str) else ""
    if not name or len(name) > NAME_MAX or any(_unprintable(ch) for ch in name):
        raise InvalidValue(f"{kind} name must be 1-{NAME_MAX} printable characters", code="invalid_name")
    return name
