"""API key format, checksum, hashing, display prefix and admin-token checks (all pure: no Redis)."""

from __future__ import annotations

import hashlib
import string

import pytest

from tokenmart.deployments import auth
from tokenmart.deployments.auth import (
    KEY_LENGTH,
    KEY_PREFIX,
    check_admin_token,
    display_prefix,
    generate_key,
    hash_key,
    hashes_match,
    is_well_formed,
    legacy_key_id,
    parse_api_key,
)
from tokenmart.deployments.errors import AuthenticationFailed

BASE62 = set(string.digits + string.ascii_letters)


@pytest.fixture
def key() -> str:
    return generate_key()


def _replace_char(text: str, index: int) -> str:
    """Swap one base62 character for a different base62 character."""
    new = "b" if text[index] == "a" else "a"
    return text[:index] + new + text[index + 1 :]


# -- format ---------------------------------------------------------------------------------


def test_generated_key_has_prefix_length_and_base62_body(key: str):
    assert key.startswith("sk-tm-")
    assert KEY_PREFIX == "sk-tm-"
    assert len(key) == KEY_LENGTH == len("sk-tm-") + 32 + 6
    assert set(key[len("sk-tm-") :]) <= BASE62


def test_generated_keys_are_unique():
    keys = {generate_key() for _ in range(200)}
    assert len(keys) == 200


def test_generated_keys_are_well_formed():
    for _ in range(200):
        assert is_well_formed(generate_key())


@pytest.mark.parametrize("index", [len("sk-tm-"), len("sk-tm-") + 15, KEY_LENGTH - 7, KEY_LENGTH - 1])
def test_changed_character_fails_checksum(key: str, index: int):
    assert not is_well_formed(_replace_char(key, index))


def test_swapped_adjacent_characters_fail_checksum():
    # find a key whose body has two different adjacent characters (almost always the first one)
    key = generate_key()
    i = next(i for i in range(6, 37) if key[i] != key[i + 1])
    swapped = key[:i] + key[i + 1] + key[i] + key[i + 2 :]
    assert not is_well_formed(swapped)


@pytest.mark.parametrize("prefix", ["sk-", "sk-xx-", "SK-TM-", "pk-tm-", "sk_tm_"])
def test_wrong_prefix_is_rejected(key: str, prefix: str):
    assert not is_well_formed(prefix + key[len("sk-tm-") :])


def test_wrong_length_is_rejected(key: str):
    assert not is_well_formed(key[:-1])
    assert not is_well_formed(key + "a")
    assert not is_well_formed("")
    assert not is_well_formed("sk-tm-")


@pytest.mark.parametrize("bad", ["-", "_", "!", " ", "é", "+", "/"])
def test_non_base62_characters_are_rejected(key: str, bad: str):
    assert not is_well_formed(key[:10] + bad + key[11:])


def test_well_formed_is_exact_for_the_key_without_whitespace(key: str):
    assert not is_well_formed(key + " ")
    assert not is_well_formed(" " + key)


# -- hashing and ids ----------------------------------------------------------------------------


def test_hash_is_sha256_hex_of_the_key(key: str):
    assert hash_key(key) == hashlib.sha256(key.encode()).hexdigest()
    assert len(hash_key(key)) == 64


def test_legacy_key_id_is_stable_and_derived_from_hash(key: str):
    """Keys from before organizations keep the id derived from their secret's hash (migrate)."""
    key_hash = hash_key(key)
    key_id = legacy_key_id(key_hash)
    assert key_id.startswith("key_")
    assert key_id == legacy_key_id(hash_key(key))
    assert key_id == "key_" + key_hash[:20]
    assert key_id != legacy_key_id(hash_key(generate_key()))


def test_legacy_key_id_does_not_contain_the_secret(key: str):
    key_id = legacy_key_id(hash_key(key))
    assert key[len("sk-tm-") : len("sk-tm-") + 8] not in key_id


def test_hashes_match_compares_exactly(key: str):
    assert hashes_match(hash_key(key), hash_key(key))
    assert not hashes_match(hash_key(key), hash_key(generate_key()))


def test_display_prefix_shows_only_four_chars_after_prefix_and_last_four(key: str):
    shown = display_prefix(key)
    assert shown == f"sk-tm-{key[6:10]}...{key[-4:]}"
    body = key[len("sk-tm-") :]
    # the secret body minus the 4 shown chars must not appear, nor any 5-char window of the hidden part
    hidden = body[4:-4]
    assert hidden not in shown
    for i in range(len(hidden) - 4):
        assert hidden[i : i + 5] not in shown
    assert len(shown) == len("sk-tm-") + 4 + 3 + 4


# -- parse_api_key: pure, raises 401 before any lookup -------------------------------------------


def test_parse_api_key_returns_only_the_hash_for_a_well_formed_key(key: str):
    # Only the sha256: the key's id and organization come from the secrets index (keystore.Locator).
    key_hash = parse_api_key(f"Bearer {key}")
    assert key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert key not in key_hash


def test_parse_api_key_accepts_lowercase_scheme_and_extra_spaces(key: str):
    assert parse_api_key(f"bearer {key}") == parse_api_key(f"Bearer {key}")
    assert parse_api_key(f"Bearer   {key}  ") == parse_api_key(f"Bearer {key}")


@pytest.mark.parametrize("header", [None, ""])
def test_missing_authorization_is_401_missing_api_key(header: str | None):
    with pytest.raises(AuthenticationFailed) as info:
        parse_api_key(header)
    exc = info.value
    assert exc.status_code == 401
    assert exc.code == "missing_api_key"
    assert "API key" in exc.message
    assert exc.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("scheme", ["Basic", "Token", "sk-tm-"])
def test_non_bearer_scheme_is_401_invalid_api_key(key: str, scheme: str):
    with pytest.raises(AuthenticationFailed) as info:
        parse_api_key(f"{scheme} {key}")
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"
    assert "Bearer" in info.value.message


def test_bare_key_without_scheme_is_401(key: str):
    with pytest.raises(AuthenticationFailed) as info:
        parse_api_key(key)
    assert info.value.status_code == 401


@pytest.mark.parametrize("token", ["Bearer", "Bearer ", "Bearer    "])
def test_bearer_without_token_is_401(token: str):
    with pytest.raises(AuthenticationFailed) as info:
        parse_api_key(token)
    assert info.value.status_code == 401


def test_malformed_key_is_401_invalid_api_key(key: str):
    with pytest.raises(AuthenticationFailed) as info:
        parse_api_key(f"Bearer {_replace_char(key, 12)}")
    exc = info.value
    assert exc.status_code == 401
    assert exc.code == "invalid_api_key"
    assert "Incorrect API key" in exc.message


def test_malformed_key_never_reaches_hashing(monkeypatch: pytest.MonkeyPatch, key: str):
    """parse_api_key is pure: a bad key is refused before it is hashed (so before any store lookup)."""
    calls: list[str] = []
    real_hash = auth.hash_key

    def spy(value: str) -> str:
        calls.append(value)
        return real_hash(value)

    monkeypatch.setattr(auth, "hash_key", spy)
    for bad in ["Bearer sk-tm-short", f"Bearer {_replace_char(key, 20)}", "Bearer sk-live-abc", "Basic abc"]:
        with pytest.raises(AuthenticationFailed):
            parse_api_key(bad)
    assert calls == []
    parse_api_key(f"Bearer {key}")
    assert calls == [key]


def test_error_message_does_not_echo_the_presented_key(key: str):
    bad = _replace_char(key, 12)
    with pytest.raises(AuthenticationFailed) as info:
        parse_api_key(f"Bearer {bad}")
    assert bad not in info.value.message


# -- admin token ----------------------------------------------------------------------------------


@pytest.mark.parametrize("configured", [None, ""])
def test_admin_api_disabled_without_configured_token(configured: str | None):
    with pytest.raises(AuthenticationFailed) as info:
        check_admin_token("Bearer anything", configured)
    assert info.value.status_code == 401
    assert info.value.code == "admin_disabled"
    assert "TOKENMART_ADMIN_TOKEN" in info.value.message


def test_wrong_admin_token_is_401():
    with pytest.raises(AuthenticationFailed) as info:
        check_admin_token("Bearer wrong-token", "right-token")
    assert info.value.status_code == 401
    assert info.value.code == "invalid_admin_token"


def test_admin_token_prefix_is_not_enough():
    with pytest.raises(AuthenticationFailed):
        check_admin_token("Bearer right", "right-token")
    with pytest.raises(AuthenticationFailed):
        check_admin_token("Bearer right-token-and-more", "right-token")


def test_missing_admin_header_is_401_missing_api_key():
    with pytest.raises(AuthenticationFailed) as info:
        check_admin_token(None, "right-token")
    assert info.value.status_code == 401
    assert info.value.code == "missing_api_key"


def test_right_admin_token_passes():
    assert check_admin_token("Bearer right-token", "right-token") is None
    assert check_admin_token("bearer right-token", "right-token") is None


def test_an_api_key_is_not_an_admin_token(key: str):
    with pytest.raises(AuthenticationFailed):
        check_admin_token(f"Bearer {key}", "right-token")
