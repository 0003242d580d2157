"""The HP-FL study's tables are built from run rows alone (no training here: the study is measured)."""

from fedllm.metrics.cost import cost_to_accuracy
from fedllm.studies.hpfl import VARIANTS, centralized_table, compression_line, federated_table


def run(label, accs, up, group="federated", remaining=1.0, targets=(0.5,)):
    rows = [{"round": 0, "accuracy": 0.1, "bytes_up": 0, "bytes_down": 0, "train_time_s": 0.0}]
    rows += [{"round": r, "accuracy": a, "bytes_up": up, "bytes_down": up, "train_time_s": 1.0}
             for r, a in enumerate(accs, start=1)]
    return {"label": label, "group": group, "remaining": remaining, "targets": list(targets),
            "cost": cost_to_accuracy(rows, targets), "rows": rows}


def test_federated_table_has_cost_columns_and_not_reached():
    # Prepare
    runs = [run("dense FL", [0.4, 0.6], 1_000_000), run("HP-FL (10 %)", [0.3, 0.4], 100_000, remaining=0.1)]
    # Execute
    table = federated_table(runs)
    # Assert
    assert "NRA@0.5" in table and "CCA@0.5 (MB)" in table
    dense_row, hpfl_row = table.splitlines()[2:]
    assert "| 2 | 4.0 | 2.0 |" in dense_row  # round 2, 2 x (1 MB up + 1 MB down), 2 s
    assert "not reached" in hpfl_row and "10.0 %" in hpfl_row


def test_centralized_table_checks_the_two_point_band_and_compression_ratio():
    runs = [run("dense centralized", [0.88], 0, "centralized"),
            run("SNIP 90 % sparse", [0.865], 0, "centralized", 0.1),
            run("SNIP 95 % sparse", [0.85], 0, "centralized", 0.05)]
    lines = centralized_table(runs).splitlines()
    assert "| -1.50 | yes |" in lines[3] and "| -3.00 | no |" in lines[4]
    q8 = compression_line({"dense FL": run("dense FL", [0.5], 4_000), "dense FL + q8 uploads": run("q8", [0.5], 1_000)})
    assert "4.00x smaller" in q8 and "+0.00 points" in q8
    assert len({v.label for v in VARIANTS}) == len(VARIANTS)
