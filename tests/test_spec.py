import pytest

from engine.errors import InputError
from engine.spec import format_heads, parse_heads


def test_issue_example():
    heads = parse_heads("3.9-15,5-22.9-15,23.12", 24, 16)
    assert (3, 9) in heads and (3, 15) in heads and (5, 9) in heads and (22, 15) in heads and (23, 12) in heads
    assert (4, 9) not in heads and (23, 11) not in heads
    assert len(heads) == 7 + 18 * 7 + 1


def test_wildcards_and_sick():
    assert parse_heads("*.3", 2, 4) == [(0, 3), (1, 3)]
    assert parse_heads("1.*", 2, 2) == [(1, 0), (1, 1)]
    assert parse_heads("sick,0.0", 3, 3, sick=[(2, 2)]) == [(0, 0), (2, 2)]


@pytest.mark.parametrize("spec,match", [
    ("", "empty head spec"), ("3", "LAYER.HEAD"), ("3.x", "bad head"), ("5-2.1", "smaller number first"),
    ("24.1", "out of range"), ("1.16", "out of range"), ("sick", "needs a diagnosis"),
])
def test_bad_specs(spec, match):
    with pytest.raises(InputError, match=match):
        parse_heads(spec, 24, 16)


def test_format_round_trips():
    heads = parse_heads("3.9-15,5-22.9-15,23.12,7.2", 24, 16)
    text = format_heads(heads)
    assert parse_heads(text, 24, 16) == heads
    assert format_heads(parse_heads("5-22.9-15", 24, 16)) == "5-22.9-15"


def test_exclusion_and_healthy_express_the_paper_plans():
    sick = [(5, 9), (5, 10), (6, 12), (2, 3)]
    band = "5-6.9-15"
    assert parse_heads(f"{band},!healthy", 8, 16, sick) == [(5, 9), (5, 10), (6, 12)]
    frozen = parse_heads(f"{band},!sick", 8, 16, sick)
    assert len(frozen) == 2 * 7 - 3 and (5, 9) not in frozen
    assert parse_heads(f"sick,!{band}", 8, 16, sick) == [(2, 3)]  # the outliers
    with pytest.raises(InputError, match="'healthy' needs a diagnosis"):
        parse_heads("!healthy", 8, 16)
