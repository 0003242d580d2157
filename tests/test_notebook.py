"""The notebooks execute top to bottom (quickstart, bring your own data, privacy-utility)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NB = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
BYO = NB.with_name("byo_data.ipynb")
PRIVACY = NB.with_name("privacy_utility.ipynb")


def _execute(path: Path, timeout: int = 600) -> str:
    """Run the notebook in its folder; its stream outputs as one text (an error output fails the test)."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not any(o.get("output_type") == "error" for o in outputs)
    return "".join(o.get("text", "") for o in outputs)


@pytest.mark.slow
def test_quickstart_notebook_runs():
    assert "federated" in _execute(NB)


@pytest.mark.slow
def test_bring_your_own_data_notebook_runs_the_three_modes_on_the_shipped_jsonl():
    text = _execute(BYO)
    for mode in ("federated", "centralized", "local"):
        assert mode in text
    assert "plotted 3 modes" in text and "held out: 12" in text


def test_privacy_utility_notebook_reads_the_study_and_its_epsilons_agree():
    text = _execute(PRIVACY, timeout=300)
    assert "independent" in text and "plotted" in text and "private runs" in text
