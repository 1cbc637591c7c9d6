"""The roles file (roles.toml beside the authorized keys): what it grants, and the one-line
error for each mistake in it."""

from __future__ import annotations

import pytest
import zmq

from zrpc._io._security import (
    NO_ROLE,
    Role,
    authorized_keys,
    is_key_text,
    keygen,
    load_roles,
    parse_roles,
)

APP, WORKER, OPS = (zmq.curve_keypair()[0] for _ in range(3))
NAMED = {"app": APP, "calc-worker": WORKER}
STRANGER = zmq.curve_keypair()[0].decode()

GOOD = f"""
[default]
call = ["echo"]

[keys.app]
call = ["calc", "billing"]

[keys.calc-worker]
serve = ["calc"]

[keys."{OPS.decode()}"]
call = ["*"]
serve = ["*"]
admin = true
"""


def parse(text: str):
    return parse_roles(text, "roles.toml", NAMED)


def test_keys_named_by_file_or_by_z85_get_their_roles_and_the_others_the_default() -> None:
    roles = parse(GOOD)
    app, worker, ops = APP.decode(), WORKER.decode(), OPS.decode()
    assert roles.may_call(app, "calc") and roles.may_call(app, "billing")
    assert not roles.may_call(app, "echo")  # a named key has its own role, not the default's too
    assert not roles.may_serve(app, "calc") and not roles.may_admin(app)
    assert roles.may_serve(worker, "calc") and not roles.may_serve(worker, "billing")
    assert not roles.may_call(worker, "calc")
    assert roles.may_serve(ops, "anything") and roles.may_call(ops, "anything") and roles.may_admin(ops)
    assert roles.may_call(STRANGER, "echo") and not roles.may_call(STRANGER, "calc")
    assert roles.role(None) is NO_ROLE  # no key: nothing
    assert roles.label(app) == "app" and roles.label(ops) == ops and roles.label(None) == "(no key)"
    assert "3 key(s) named" in roles.describe() and "call echo" in roles.describe()


def test_without_a_default_an_unnamed_key_may_do_nothing() -> None:
    roles = parse("[keys.app]\ncall = ['calc']\n")
    assert roles.role(STRANGER) == NO_ROLE == Role()
    assert not roles.may_call(STRANGER, "calc") and not roles.may_admin(STRANGER)
    assert parse("").keys == {}  # an empty file: nobody may do anything but ping and health


@pytest.mark.parametrize(("text", "error"), [
    ("[keys.app\ncall = ", "roles.toml is not valid TOML"),
    ("[workers]\n", "unknown table or key workers"),
    ("keys = 1\n", "`keys` must be tables"),
    ("[keys.nobody]\ncall = ['calc']\n", r"\[keys.nobody\]: there is no nobody.key"),
    ("[keys.app]\ncalls = ['calc']\n", r"\[keys.app\]: unknown field calls"),
    ("[keys.app]\ncall = 'calc'\n", "call must be a list of service names"),
    ("[keys.app]\nserve = ['']\n", "serve must be a list of service names"),
    ("[keys.app]\nadmin = 'yes'\n", "admin must be true or false"),
    ("[keys.app]\ncall = ['zrpc']\n", "admin = true"),
    ("[default]\nserve = [1]\n", r"\[default\]: serve must be"),
    ("[keys]\napp = 3\n", r"\[keys.app\]: expected a table"),
    (f"[keys.app]\n[keys.\"{APP.decode()}\"]\n", "this key has a table already"),
])
def test_each_mistake_is_one_line_naming_the_file_and_the_table(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error) as info:
        parse(text)
    assert "\n" not in str(info.value) and str(info.value).startswith("roles.toml")


def test_z85_text_is_told_from_a_name() -> None:
    assert is_key_text(APP.decode())
    assert not is_key_text("app") and not is_key_text("x" * 39 + "\"") and not is_key_text("é" * 40)


def test_the_roles_file_is_found_in_the_authorized_directory(tmp_path) -> None:
    auth = tmp_path / "authorized"
    public, _ = keygen(tmp_path / "keys", "app")
    auth.mkdir()
    (auth / "app.key").write_bytes(public.read_bytes())
    named = authorized_keys(auth)
    assert set(named) == {"app"}
    assert load_roles(auth, named) is None  # none: no roles (every key may do everything)
    (auth / "roles.toml").write_text("[keys.app]\ncall = ['calc']\n")
    roles = load_roles(auth, named)
    assert roles is not None and roles.may_call(named["app"].decode(), "calc")
    assert roles.source == str(auth / "roles.toml")
    (auth / "roles.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="cannot read"):
        load_roles(auth, named)
