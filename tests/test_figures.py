"""`head-surgeon figures`: PNG and SVG figures of a run or a diagnosis, built here without training."""

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.errors import InputError
from engine.figures import DIAGNOSIS_FIGURES, RUN_FIGURES, build_figures, load_inputs, write_figures
from engine.report import HeadReport

N_LAYER, N_HEAD = 3, 4
SLOPES = [2 ** -(8 * (h + 1) / N_HEAD) for h in range(N_HEAD)]


def diagnosis(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    grids = [rng.random((N_LAYER, N_HEAD)) for _ in range(4)]
    grids[0][:, 3] = 0.97  # head 3 dead in every layer: the band
    return HeadReport("organism", N_LAYER, N_HEAD, SLOPES, grids[0], grids[1] * 3, grids[2], grids[3]).to_json()


def history(scale: float) -> list[dict]:
    """Two passes (steps restart at 0 for the second); one null perplexity (a NaN, as reports write it)."""
    points = [{"step": s, "train_ppl": scale * (30 - s / 10), "heldout_ppl": scale * (32 - s / 12)}
              for s in (0, 50, 100)]
    points[0]["train_ppl"] = None
    return points + [{"step": s, "train_ppl": scale * 18, "heldout_ppl": scale * 22} for s in (0, 50)]


def operation_report(control: bool = False) -> dict:
    drift = {"threshold": 0.05, "untouched_heads": 9, "drifted": 2, "outside_target_columns": [],
             "frozen_in_target_columns": [], "other_in_target_columns": [], "per_column": [0, 1, 1, 0],
             "max_abs_delta": 0.08}
    report = {"schema_version": 1, "base_model": {"ref": "organism", "n_layer": N_LAYER, "n_head": N_HEAD},
              "diagnosis_before": diagnosis(0), "diagnosis_after": diagnosis(1), "history": history(1.0),
              "drift": drift, "ppl": {"heldout_before": 25.0, "heldout_after": 20.0}}
    if control:
        report["control"] = {"history": history(1.1), "ppl": {"heldout_after": 24.0},
                             "drift": {**drift, "per_column": [1, 0, 0, 0]}, "diagnosis_after": diagnosis(2)}
    return report


def run_dir(tmp_path, report: dict):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "report.json").write_text(json.dumps(report))
    return run


@pytest.fixture(scope="module")
def run_figures(tmp_path_factory):
    """The figures of a run with a control arm, written once through the command line, in-process."""
    from tui.entry import main

    tmp = tmp_path_factory.mktemp("figs")
    out, printed = tmp / "out", io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(["figures", str(run_dir(tmp, operation_report(control=True))), "--out", str(out)])
    return out, status, [Path(line) for line in printed.getvalue().splitlines()]


def test_a_run_gives_every_figure_as_png_and_svg(run_figures):
    out, status, written = run_figures
    assert status == 0
    assert sorted(p.name for p in written) == sorted(f"{n}.{ext}" for n in RUN_FIGURES for ext in ("png", "svg"))
    assert sorted(out.iterdir()) == sorted(written)  # no temp files left behind
    assert all(p.stat().st_size > 5_000 for p in written)


def test_the_pngs_open_with_sane_dimensions(run_figures):
    from matplotlib.image import imread

    for path in run_figures[0].glob("*.png"):
        height, width = imread(path).shape[:2]
        assert 400 <= width <= 4000 and 300 <= height <= 4000, (path.name, width, height)


def test_the_grid_svg_names_every_layer_and_head_with_its_slope(run_figures):
    svg = (run_figures[0] / "bos_grid.svg").read_text()
    assert all(f"L{l}" in svg for l in range(N_LAYER)) and "L3" not in svg
    assert all(f"H{h}" in svg for h in range(N_HEAD)) and "H4" not in svg
    assert "0.0039" in svg and "organism" in svg


def test_the_grid_axes_carry_the_model_dimensions(tmp_path):
    figures = build_figures(load_inputs(run_dir(tmp_path, operation_report())))
    grids = [ax for ax in figures["bos_grid"].axes if ax.get_images()]  # before, after, difference
    assert len(grids) == 3
    for ax in grids:
        assert len(ax.get_xticks()) == N_HEAD and len(ax.get_yticks()) == N_LAYER
        assert ax.get_images()[0].get_array().shape == (N_LAYER, N_HEAD)
    assert [t.get_text() for t in grids[0].get_xticklabels()][3] == "H3\n0.0039"
    for name in ("sick_per_head", "drift_per_column"):
        assert len(figures[name].axes[0].get_xticks()) == N_HEAD


def test_without_a_control_arm_only_the_surgery_is_drawn(tmp_path):
    figures = build_figures(load_inputs(run_dir(tmp_path, operation_report())))
    assert [line.get_label() for line in figures["perplexity"].axes[0].get_lines()] == ["surgery", "before surgery"]
    assert len(figures["drift_per_column"].axes[0].patches) == N_HEAD


def test_the_control_arm_is_drawn_dashed_when_present(tmp_path):
    figures = build_figures(load_inputs(run_dir(tmp_path, operation_report(control=True)) / "report.json"))
    heldout = figures["perplexity"].axes[0]
    styles = {line.get_label(): line.get_linestyle() for line in heldout.get_lines()}
    assert styles["surgery"] == "-" and styles["control"] == "--"
    steps = heldout.get_lines()[0].get_xdata()
    assert list(steps) == [0, 50, 100, 100, 150]  # the second pass continues after the first
    assert len(figures["drift_per_column"].axes[0].patches) == 2 * N_HEAD


def test_a_tracked_set_gets_its_own_panel_with_its_before_line(tmp_path):
    report = operation_report()
    for n, point in enumerate(report["history"]):
        point["tracked_ppl"] = 15.0 - n
    report["ppl"]["tracked_before"] = 16.0
    axes = build_figures(load_inputs(run_dir(tmp_path, report)))["perplexity"].axes
    assert len(axes) == 3 and axes[2].get_title() == "tracked in-domain set perplexity"
    surgery, before = axes[2].get_lines()
    assert list(surgery.get_ydata()) == [15.0, 14.0, 13.0, 12.0, 11.0] and list(before.get_ydata()) == [16.0, 16.0]
    (tmp_path / "plain").mkdir()
    assert len(build_figures(load_inputs(run_dir(tmp_path / "plain", operation_report())))["perplexity"].axes) == 2


def test_a_diagnosis_gives_only_its_figures(tmp_path):
    source = tmp_path / "d.json"
    source.write_text(json.dumps(diagnosis(0)))
    written = write_figures(source, tmp_path / "out")
    assert sorted(p.name for p in written) == sorted(f"{n}.{ext}" for n in DIAGNOSIS_FIGURES for ext in ("png", "svg"))
    assert len(build_figures(load_inputs(source))["bos_grid"].axes) == 2  # one grid and its colour bar


def test_an_existing_out_is_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match="already exists") as err:
        write_figures(run_dir(tmp_path, operation_report()), out)
    assert "\n" not in str(err.value) and list(out.iterdir()) == []


@pytest.mark.parametrize("content, message", [
    (None, "not a run directory"),
    ("{not json", "is not JSON"),
    ('{"hello": 1}', "neither a surgery report nor a diagnosis"),
    (json.dumps({**operation_report(), "drift": {"per_column": [0]}}), "drift.per_column"),
    (json.dumps({k: v for k, v in operation_report().items() if k != "history"}), "history"),
])
def test_bad_input_is_one_line_and_creates_no_out(tmp_path, content, message):
    source = tmp_path / "src"
    if content is None:
        source.mkdir()
    else:
        source.write_text(content)
    with pytest.raises(InputError, match=message) as err:
        write_figures(source, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_an_unfinished_run_is_named_as_such(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    with pytest.raises(InputError, match="no report.json yet"):
        write_figures(run, tmp_path / "out")


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(InputError) as err:
        write_figures(run_dir(tmp_path, operation_report()), tmp_path / "out")
    assert str(err.value) == "figures need matplotlib: pip install 'head-surgeon[figures]'"
    assert not (tmp_path / "out").exists()


def test_the_cli_refuses_an_existing_out_in_one_line(run_figures, capsys):
    from tui.entry import main

    out = run_figures[0]
    assert main(["figures", str(out.parent / "run"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and len(list(out.iterdir())) == 2 * len(RUN_FIGURES)
