"""The quickstart notebook executes top to bottom."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NB = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
BYO = NB.with_name("byo_data.ipynb")
PRIVACY = NB.with_name("privacy_utility.ipynb")


@pytest.mark.slow
def test_quickstart_notebook_runs():
    nb = nbformat.read(NB, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NB.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not any(o.get("output_type") == "error" for o in outputs)
    assert any("federated" in o.get("text", "") for o in outputs)


@pytest.mark.slow
def test_bring_your_own_data_notebook_runs_the_three_modes_on_the_shipped_jsonl():
    nb = nbformat.read(BYO, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(BYO.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not any(o.get("output_type") == "error" for o in outputs)
    text = "".join(o.get("text", "") for o in outputs)
    for mode in ("federated", "centralized", "local"):
        assert mode in text
    assert "plotted 3 modes" in text and "held out: 12" in text


def test_privacy_utility_notebook_reads_the_study_and_its_epsilons_agree():
    nb = nbformat.read(PRIVACY, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(PRIVACY.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not any(o.get("output_type") == "error" for o in outputs)
    text = "".join(o.get("text", "") for o in outputs)
    assert "independent" in text and "plotted" in text and "private runs" in text
