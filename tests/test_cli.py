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
    (["reproduce", "--seeds", "0", "--quick"], "--seeds must be at least 1"),
    (["reproduce", "--reanalyze", "--out", "{tmp}/none"], "no runs/*.jsonl"),
])  # fmt: skip
def test_reproduce_bad_arguments_are_messages(argv, needle, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    assert needle in capsys.readouterr().err
