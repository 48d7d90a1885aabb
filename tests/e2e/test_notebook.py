"""The quickstart notebook runs top to bottom at its small scale and shows its pictures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("INSTAFLOW_PL_NOTEBOOK_OUT", str(tmp_path / "demo-small"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()

    images = [
        cell
        for cell in notebook.cells
        if cell.cell_type == "code" and any("image/png" in out.get("data", {}) for out in cell.get("outputs", []))
    ]
    assert len(images) >= 4  # real digits, trajectories, samples, report grid
    report = json.loads((tmp_path / "demo-small" / "report.json").read_text())
    assert [f["key"] for f in report["findings"]] == ["a", "b", "c", "d"]
    assert all(f["verdict"] in ("reproduced", "partly reproduced", "not reproduced") for f in report["findings"])
    markdown = [
        out for cell in notebook.cells for out in cell.get("outputs", []) if "text/markdown" in out.get("data", {})
    ]
    assert any("## Findings" in out["data"]["text/markdown"] for out in markdown)
