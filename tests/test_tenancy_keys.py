"""serve/tenancy.py Keys: the Authorization header's scheme in any case, every key compared in
constant time (each one, whether the request's key is the first, the last or none), and the
--api-key option refusing what would silently open the server: a keys file that is not there, an
empty key, a file that cannot be read."""

from __future__ import annotations

import hmac
import json
import os

import pytest

from adapterhub.serve.errors import Denied
from adapterhub.serve.tenancy import ALL, Keys

KEYS = {"sk-admin": ALL, "sk-tenant": frozenset({"a0", "tiny"}), "sk-other": frozenset({"a1"})}


def keys_file(path, keys) -> str:
    path.write_text(json.dumps({"keys": keys}))
    return str(path)


def test_bearer_scheme_in_any_case():
    keys = Keys(dict(KEYS))
    for header in ("Bearer sk-tenant", "bearer sk-tenant", "BEARER sk-tenant", "bEaReR   sk-tenant "):
        assert keys.names_for(header) == KEYS["sk-tenant"]
        keys.check(header, "a0")
        assert keys.visible(header, ["tiny", "a0", "a1"]) == ["tiny", "a0"]
        with pytest.raises(Denied) as denied:
            keys.check(header, "a1")
        assert denied.value.status == 403


def test_anything_but_bearer_and_a_known_key_is_401():
    """A bare key (no scheme) too: "sk-admin" alone used to pass."""
    keys = Keys(dict(KEYS))
    for header in (
        None,
        "",
        "sk-admin",
        "Basic sk-admin",
        "Token sk-admin",
        "Bearersk-admin",
        "Bearer",
        "Bearer  ",
        "Bearer sk-adm",
        "Bearer sk-admin sk-admin",
    ):
        with pytest.raises(Denied) as denied:
            keys.names_for(header)
        assert denied.value.status == 401, header


@pytest.mark.parametrize("key", ["sk-admin", "sk-other", "sk-nobody"])
def test_every_key_is_compared_in_constant_time(monkeypatch, key):
    """hmac.compare_digest runs once per configured key whichever key matches (or none): the time a
    request takes does not tell how far down the list its key is, or how much of it was right."""
    calls, real = [], hmac.compare_digest

    def counted(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr("adapterhub.serve.tenancy.hmac.compare_digest", counted)
    keys = Keys(dict(KEYS))
    try:
        keys.names_for(f"Bearer {key}")
    except Denied:
        assert key == "sk-nobody"
    assert len(calls) == len(KEYS)
    assert len({n for pair in calls for n in pair}) == 1  # fixed-length digests, not the keys themselves


def test_a_plain_value_is_one_admin_key():
    keys = Keys.from_option("sk-plain")
    keys.check("Bearer sk-plain")  # the admin endpoints
    long_key = "k" * 5000  # longer than a file name may be: still a key, not an OSError
    assert Keys.from_option(long_key).names_for(f"Bearer {long_key}") == ALL


@pytest.mark.parametrize("value", ["missing-file.json", "keys.TOML", "conf/keys", "./keys"])
def test_a_missing_keys_file_is_refused_not_taken_as_a_key(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"{value}: no such file; pass an existing keys file"):
        Keys.from_option(value)


def test_a_folder_named_like_a_keys_file_is_refused(tmp_path):
    (tmp_path / "keys.json").mkdir()
    with pytest.raises(ValueError, match=r"keys\.json: not a file"):
        Keys.from_option(str(tmp_path / "keys.json"))


@pytest.mark.parametrize("value", ["", " ", "\t\n"])
def test_an_empty_key_option_is_refused(value):
    with pytest.raises(ValueError, match="empty"):
        Keys.from_option(value)


@pytest.mark.parametrize("bad", ["", "   ", " sk-padded"])
def test_an_empty_or_padded_key_in_the_file_is_refused(tmp_path, bad):
    path = keys_file(tmp_path / "keys.json", {"sk-admin": "*", bad: ["a0"]})
    with pytest.raises(ValueError, match=r"keys\.json: API key .*(empty|spaces)"):
        Keys.from_option(path)
    with pytest.raises(ValueError, match=r"empty|spaces"):
        Keys({bad: ALL})


def test_toml_and_json_files(tmp_path):
    toml = tmp_path / "keys.toml"
    toml.write_text('[keys]\n"sk-a" = ["a0"]\n"sk-admin" = "*"\n')
    assert Keys.from_option(str(toml)).names_for("bearer sk-a") == frozenset({"a0"})
    assert Keys.from_option(keys_file(tmp_path / "k.json", {"sk-b": ["x"]})).names_for("Bearer sk-b") == {"x"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_keys_file_is_named(tmp_path):
    path = keys_file(tmp_path / "keys.json", {"sk-admin": "*"})
    os.chmod(path, 0)
    try:
        with pytest.raises(ValueError, match=r"keys\.json: cannot be read \(Permission denied\)"):
            Keys.from_option(path)
    finally:
        os.chmod(path, 0o600)


def test_a_keys_file_that_cannot_be_read_is_named(tmp_path):
    """/proc/self/mem is a regular file that even root cannot read from offset 0 (EIO)."""
    if not os.path.isfile("/proc/self/mem"):
        pytest.skip("no /proc")
    link = tmp_path / "keys.json"
    link.symlink_to("/proc/self/mem")
    with pytest.raises(ValueError, match=r"keys\.json: cannot be read \("):
        Keys.from_option(str(link))
