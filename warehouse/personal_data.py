"""What the warehouse stores of personal data: phone numbers, conversation text, recording URLs.

One setting per column class, read once at the sink's start (`CALLSTREAM_STORE_*`), applied by the
row builder (`warehouse.records`), so the DuckDB sink and the lake sink store the same thing:

- phone numbers (`from_number`, `to_number`): `keep` as sent, `mask` to the last four digits
  (`****1234`), or `hash` with HMAC-SHA256 keyed by `CALLSTREAM_PHONE_HASH_KEY` (64 hex digits; one
  number always gives the same hash, so analysts can still join and count distinct callers, and
  without the key nobody can try every number to reverse it);
- transcripts (`keep` or `drop`): the transcript, utterance and chat message text and detail, the
  summary (it retells the conversation) and tool-call arguments and results (they carry what was said);
  the rows of utterances and messages stay, with role and timing;
- recording URLs (`keep` or `drop`).

A call that opted out of storage loses its conversation content whatever these say (`records.opted_out`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator

from kernel.settings import CommonSettings

PhoneRule = Literal["keep", "mask", "hash"]
TextRule = Literal["keep", "drop"]

MASK = "****"
MIN_KEY_CHARS = 16
# What people write between the digits of a number; the platforms send E.164 (+14155551234).
_SEPARATORS = re.compile(r"[\s().\-/]")
SQL_SEPARATORS = r"[\s().\-/]"


class PersonalDataSettings(CommonSettings):
    """`CALLSTREAM_STORE_*` and the hash key: shared by both sinks and `callstream warehouse forget`."""

    store_phone_numbers: PhoneRule = "keep"
    store_transcripts: TextRule = "keep"
    store_recording_urls: TextRule = "keep"
    # Declared after store_phone_numbers: its check reads that value, also when the key is unset.
    phone_hash_key: SecretStr | None = Field(default=None, validate_default=True)

    @field_validator("phone_hash_key", mode="after")
    @classmethod
    def _key_for_hash(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_KEY_CHARS:
            raise ValueError(
                f"is shorter than {MIN_KEY_CHARS} characters; use a random one, e.g. the output of "
                "`python -c 'import secrets; print(secrets.token_hex(32))'`"
            )
        if value is None and info.data.get("store_phone_numbers") == "hash":
            raise ValueError(
                "is required with CALLSTREAM_STORE_PHONE_NUMBERS=hash (a random key of 16 characters or more; "
                "keep it secret and never change it, or the same caller gets a new hash)"
            )
        return value


def normalize_number(number: str) -> str:
    """The number without the separators people type (`+1 (415) 555-1234` -> `+14155551234`)."""
    return _SEPARATORS.sub("", number.strip())


def mask_number(number: str) -> str:
    """`****` and the last four digits (all masked when the number has four digits or fewer)."""
    digits = [c for c in number if c.isdigit()]
    return MASK + "".join(digits[-4:]) if len(digits) > 4 else MASK


def hash_number(number: str, key: bytes) -> str:
    """HMAC-SHA256 of the normalized number, as 64 hex digits."""
    return hmac.new(key, normalize_number(number).encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class PersonalData:
    """The rules as the row builder applies them."""

    phone_numbers: PhoneRule = "keep"
    transcripts: bool = True
    recording_urls: bool = True
    key: bytes | None = None

    @classmethod
    def from_settings(cls, s: PersonalDataSettings) -> PersonalData:
        return cls(
            phone_numbers=s.store_phone_numbers,
            transcripts=s.store_transcripts == "keep",
            recording_urls=s.store_recording_urls == "keep",
            key=s.phone_hash_key.get_secret_value().encode() if s.phone_hash_key is not None else None,
        )

    def number(self, value: str | None) -> str | None:
        """A phone number as it is stored."""
        if value is None or self.phone_numbers == "keep":
            return value
        if self.phone_numbers == "mask":
            return mask_number(value)
        assert self.key is not None, "the settings refuse hash without a key"
        return hash_number(value, self.key)

    def describe(self) -> str:
        """For the sink's start-up line (never the key)."""
        return (
            f"phone numbers {self.phone_numbers}, transcripts {'kept' if self.transcripts else 'dropped'}, "
            f"recording URLs {'kept' if self.recording_urls else 'dropped'}"
        )


KEEP_ALL = PersonalData()
