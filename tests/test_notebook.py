"""The notebooks execute top to bottom (quickstart, bring your own data, privacy-utility), show their
figures inline (PNG outputs, no Agg backend) and write their runs into runs/notebooks/."""

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks" / "quickstart.ipynb"
BYO = NB.with_name("byo_data.ipynb")
PRIVACY = NB.with_name("privacy_utility.ipynb")


def _execute(path: Path, timeout: int = 600, figures: int = 1) -> str:
    """Run the notebook in its folder; its stream outputs as one text (an error output fails the test).
    At least ``figures`` figures must be shown inline (image/png outputs)."""
    nb = nbformat.read(path, as_version=4)
    assert "matplotlib.use(" not in "".join(c.source for c in nb.cells)  # Agg would hide every figure
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not any(o.get("output_type") == "error" for o in outputs)
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= figures
    return "".join(o.get("text", "") for o in outputs)


@pytest.mark.slow
def test_quickstart_notebook_runs():
    start = time.time()
    assert "federated" in _execute(NB, figures=2)
    assert (ROOT / "runs" / "notebooks" / "tiny" / "comparison.json").stat().st_mtime >= start  # a named folder


@pytest.mark.slow
def test_bring_your_own_data_notebook_runs_the_three_modes_on_the_shipped_jsonl():
    start = time.time()
    text = _execute(BYO)
    for mode in ("federated", "centralized", "local"):
        assert mode in text
    assert "plotted 3 modes" in text and "held out: 12" in text
    assert (ROOT / "runs" / "notebooks" / "byo_data" / "comparison.json").stat().st_mtime >= start


def test_privacy_utility_notebook_reads_the_study_and_its_epsilons_agree():
    text = _execute(PRIVACY, timeout=300)
    assert "independent" in text and "plotted" in text and "private runs" in text
