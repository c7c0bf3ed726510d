"""The ``kappa-gpu`` command: the demo's JSON is strict JSON, bad arguments give messages."""

from __future__ import annotations

import io
import json
import math

import pytest

from kappa_gpu.cli import main, run_demo


def _strict(text: str):
    def no_constant(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=no_constant)


def test_demo_json_is_strict_with_non_finite_figures(tmp_path):
    """momentum=0 (plain SGD): no complex modes, so the EP ratio is nan; the file must still
    be standard JSON (nan/inf as strings, as in the reports' to_dict())."""
    out = tmp_path / "demo.json"
    records = run_demo(steps=20, every=10, k=2, momentum=0.0, out=out, stream=io.StringIO())
    assert any(math.isnan(r["nearest_ep_ratio"]) for r in records)  # the case is exercised
    data = _strict(out.read_text())
    assert len(data["records"]) == len(records) == 2
    assert data["records"][0]["nearest_ep_ratio"] == "nan"
    assert data["records"][0]["kappa_V"] == pytest.approx(records[0]["kappa_V"])


@pytest.mark.parametrize("argv,needle", [
    (["reproduce", "--seeds", "0", "--quick"], "argument --seeds: expected an integer >= 1"),
    (["reproduce", "--reanalyze", "--out", "{tmp}/none"], "no runs/*.jsonl"),
    # review cases: rc 0 with nan results, a silent default, or a traceback
    (["reproduce", "--quick", "-k", "0"], "argument -k: expected an integer >= 1, got 0"),
    (["reproduce", "--every", "0"], "argument --every"),
    (["reproduce", "--steps", "0"], "argument --steps"),
    (["demo", "-k", "0"], "argument -k"),
    (["demo", "--every", "0"], "argument --every"),
    (["demo", "--out", "{tmp}/missing/x.json"], "not a file in an existing directory"),
])  # fmt: skip
def test_bad_arguments_are_messages(argv, needle, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_reproduce_without_matplotlib_writes_the_summary(tmp_path, monkeypatch, capsys):
    """The README's plain install has no matplotlib: reproduce crashed after the runs, before
    writing the summary (figures are on by default). Now the figures are skipped, said, and
    the summary written."""
    import sys

    monkeypatch.setitem(sys.modules, "kappa_gpu.experiments._plots", None)  # import fails
    out = tmp_path / "r"
    rc = main(["reproduce", "--quick", "--no-dense", "--steps", "40", "-k", "2", "--quiet",
               "--workers", "1", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "kappa-gpu[plot]" in summary["figures_error"]
    assert (out / "summary.md").exists()
    assert "figures skipped" in capsys.readouterr().err
