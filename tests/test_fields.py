"""meshd.fields: the one reading of a peer's fields. A figure is a finite number or nothing."""

import math

import pytest

from meshd.fields import wire_bool, wire_int, wire_number, wire_text


@pytest.mark.parametrize("value, expected", [
    (3, 3.0), (2.5, 2.5), (-1, -1.0), (0, 0.0),
    (True, None), (False, None), ("1.5", None), (None, None), ([1], None),
    (math.nan, None), (math.inf, None), (-math.inf, None),
    (10 ** 400, None),  # past a float's range: JSON readers hand such integers over as they are
], ids=repr)
def test_a_number_is_a_finite_float_or_none(value, expected):
    assert wire_number(value) == expected


def test_ints_bools_and_text_keep_apart():
    assert wire_int(7) == 7 and wire_int(True) is None and wire_int(7.0) is None
    assert wire_bool(True) is True and wire_bool(1) is None and wire_bool("false") is None
    assert wire_text("x" * 300) == "x" * 200 and wire_text("abc", 2) == "ab" and wire_text(3) is None
