"""The personal-data settings and the number rules: masks, keyed hashes, and a hash without a key refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kernel.settings import config_problem
from warehouse.personal_data import PersonalData, PersonalDataSettings, hash_number, mask_number, normalize_number

KEY = "0123456789abcdef-personal"


def test_defaults_keep_everything_as_today():
    p = PersonalData.from_settings(PersonalDataSettings())
    assert (p.phone_numbers, p.transcripts, p.recording_urls, p.key) == ("keep", True, True, None)
    assert p.number("+14155550100") == "+14155550100"


def test_hash_without_a_key_is_one_line_naming_the_variable():
    with pytest.raises(ValidationError) as exc:
        PersonalDataSettings(store_phone_numbers="hash")
    line = config_problem(exc.value)
    assert line.startswith("configuration: CALLSTREAM_PHONE_HASH_KEY: is required") and "\n" not in line
    with pytest.raises(ValidationError, match="shorter than 16"):
        PersonalDataSettings(store_phone_numbers="hash", phone_hash_key="short")
    with pytest.raises(ValidationError, match="'keep', 'mask' or 'hash'"):
        PersonalDataSettings(store_phone_numbers="scramble")


def test_the_key_is_read_from_the_environment_and_never_shown(monkeypatch):
    monkeypatch.setenv("CALLSTREAM_STORE_PHONE_NUMBERS", "hash")
    monkeypatch.setenv("CALLSTREAM_PHONE_HASH_KEY", KEY)
    s = PersonalDataSettings()
    assert KEY not in repr(s) and KEY not in str(s.model_dump())
    p = PersonalData.from_settings(s)
    assert p.number("+14155550100") == hash_number("+14155550100", KEY.encode())
    assert KEY not in p.describe()


def test_masks_keep_the_last_four_digits_only():
    assert mask_number("+14155550123") == "****0123"
    assert mask_number("+1 (415) 555-0123") == "****0123"
    assert mask_number("1234") == "****"  # nothing of a short number is shown
    assert mask_number("") == "****"


def test_hashes_are_keyed_stable_and_ignore_separators():
    h = hash_number("+14155550123", KEY.encode())
    assert len(h) == 64 and int(h, 16) >= 0
    assert hash_number("+1 (415) 555-0123", KEY.encode()) == hash_number("+1.415.555.0123", KEY.encode()) == h
    assert hash_number("+14155550123", b"another-key-0123456") != h
    assert hash_number("+14155550124", KEY.encode()) != h
    assert normalize_number(" +1 415/555-0123 ") == "+14155550123"
