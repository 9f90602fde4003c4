"""Errors are types carrying their wire code: callers catch a type, the wire keeps its codes."""

import pytest

from meshd import errors
from meshd.errors import (CODES, RETRYABLE, AuthRefused, Busy, Draining, InternalError, MeshError, Mismatch, PeerLost,
                          ProtocolViolation)


@pytest.mark.parametrize("code", CODES)
def test_every_wire_code_has_its_own_type_and_survives_the_wire_unchanged(code):
    raised = MeshError(code, "what happened", peer="10.0.0.7:7777")
    assert type(raised) is not MeshError and type(raised).CODE == raised.code == code
    back = MeshError.from_wire(raised.to_wire(), peer="elsewhere:1")
    assert type(back) is type(raised) and back.code == code and back.peer == "10.0.0.7:7777"
    assert back.to_wire() == {"code": code, "message": "what happened", "peer": "10.0.0.7:7777"}
    assert len({type(MeshError(c, "")) for c in CODES}) == len(CODES)  # no two codes share a type


def test_an_error_raised_by_code_is_caught_by_its_type():
    with pytest.raises(Busy) as caught:
        raise MeshError("busy", "queue full", peer="b:1")
    assert str(caught.value) == "b:1: queue full" and isinstance(caught.value, MeshError)
    with pytest.raises(AuthRefused):
        raise MeshError("auth", "wrong key")
    assert not isinstance(MeshError("mismatch", "x"), (Busy, AuthRefused, InternalError))


def test_typed_errors_are_raised_with_a_message_alone():
    assert Mismatch("blocks differ").to_wire() == {"code": "mismatch", "message": "blocks differ"}
    lost = PeerLost("10.0.0.7:7777", "connection closed by peer")
    assert lost.code == "peer-lost" and str(lost) == "10.0.0.7:7777: connection closed by peer"


def test_unknown_or_malformed_codes_from_a_peer_become_internal_errors():
    assert type(MeshError.from_wire({"code": "gremlins", "message": "m"}, "p:1")) is InternalError
    odd = MeshError.from_wire({"code": ["busy"], "message": 7}, "p:1")
    assert type(odd) is InternalError and odd.message == "peer sent an error without a message" and odd.peer == "p:1"


def test_only_a_lost_or_draining_peer_is_worth_a_retry():
    assert isinstance(MeshError("peer-lost", "gone"), RETRYABLE) and isinstance(Draining("stopping"), RETRYABLE)
    assert not isinstance(MeshError("oom", "no memory"), RETRYABLE)
    assert not isinstance(ProtocolViolation("bad frame"), RETRYABLE)


def test_a_code_gets_one_type_only():
    with pytest.raises(TypeError, match="already has a type"):
        type("SecondBusy", (errors._Coded,), {}, code="busy")
