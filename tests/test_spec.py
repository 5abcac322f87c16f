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


def _report():
    """A 2 x 4 report: L0.H0 positional, L0.H1 low-entropy (not local), L0.H2 sink, L0.H3 dead, layer 1 healthy."""
    import numpy as np

    from engine.report import HeadReport

    bos = np.array([[0.01, 0.10, 0.60, 0.99], [0.05, 0.10, 0.20, 0.30]])
    entropy = np.array([[0.2, 0.3, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    local = np.array([[0.9, 0.2, 0.1, 0.0], [0.3, 0.3, 0.3, 0.3]])
    contribution = np.array([[0.5, 0.01, 0.2, 0.9], [0.1, 0.04, 0.3, 0.2]])
    return HeadReport("m", 2, 4, [0.5, 0.25, 0.125, 0.0625], bos, entropy, local, contribution)


def test_class_words_name_the_paper_s_sick_and_keep_positional_heads_apart():
    r = _report()
    assert r.classes.tolist()[0] == ["positional", "low-entropy", "bos-sink", "dead"]
    assert parse_heads("sick", 2, 4, report=r) == [(0, 2), (0, 3)]  # never the low-entropy or positional heads
    assert parse_heads("sink", 2, 4, report=r) == parse_heads("bos-sink", 2, 4, report=r) == [(0, 2)]
    assert parse_heads("positional", 2, 4, report=r) == [(0, 0)]
    assert parse_heads("low-entropy,dead", 2, 4, report=r) == [(0, 1), (0, 3)]
    assert parse_heads("healthy", 2, 4, report=r) == [(1, h) for h in range(4)]


def test_predicates_combine_with_ranges_intersections_and_removals():
    r = _report()
    assert parse_heads("bos>0.5", 2, 4, report=r) == [(0, 2), (0, 3)]
    assert parse_heads("contribution < 0.05", 2, 4, report=r) == [(0, 1), (1, 1)]
    assert parse_heads("1.*&bos>=0.2", 2, 4, report=r) == [(1, 2), (1, 3)]
    assert parse_heads("*.1-3,!contrib<0.05", 2, 4, report=r) == [(0, 2), (0, 3), (1, 2), (1, 3)]
    assert parse_heads("entropy<=0.3&local>0.5", 2, 4, report=r) == [(0, 0)]


@pytest.mark.parametrize("spec,match", [
    ("bos>0.5", "needs a diagnosis"), ("positional", "needs a diagnosis"), ("slope>1", "unknown statistic"),
    ("1.*&", "PART&PART"), ("1.2&x", "LAYER.HEAD"),
])
def test_words_and_predicates_without_a_diagnosis_or_malformed(spec, match):
    with pytest.raises(InputError, match=match):
        parse_heads(spec, 2, 4)


def test_syntax_is_checked_without_a_model_and_words_ask_for_a_diagnosis():
    from engine.spec import check_syntax, needs_report

    check_syntax("5-22.9-15&sick,!bos<0.1,3.*")
    for bad in ("3.x", "slope>1", "5-2.1"):
        with pytest.raises(InputError):
            check_syntax(bad)
    assert needs_report("1.2,!sick") and needs_report("contribution<0.1") and not needs_report("1.2,3.*")


def test_sink_rate_band_and_the_paper_s_four_class_counts():
    import numpy as np

    from engine.report import HeadReport, Thresholds

    r = _report()
    per_layer, overall = r.sink_rate()
    assert per_layer == [0.5, 0.0] and overall == 0.25  # first-token mass > 0.3: L0.H2, L0.H3
    assert r.band() == [2, 3]  # sick in 1 of 2 layers = 50% > 30%
    assert r.with_thresholds(Thresholds(band_share=0.5)).band() == []
    assert r.paper_counts() == {"healthy": 4, "bos-sink": 1, "dead": 1, "low-entropy": 2}
    data = r.to_json()
    assert data["paper_counts"]["low-entropy"] == 2 and data["counts"]["positional"] == 1
    assert data["sink_rate"] == {"per_layer": [0.5, 0.0], "model": 0.25, "epsilon": 0.3}
    assert data["band"] == {"heads": [2, 3], "share": 0.3}
    back = HeadReport.from_json(data)
    assert np.array_equal(back.classes, r.classes)
