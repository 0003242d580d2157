"""The cloned-KD edge study: one command from an edge recipe to its table, plot and raw numbers.

    python -m fedllm.studies.edge --out docs/edge_study            # the measured study (~10 min CPU)
    python -m fedllm.studies.edge --out /tmp/edge --quick          # CI size (seconds)
    fedllm edge recipes/edge/fashion_mnist_cloned_kd.yaml [overrides] [--out DIR] [--quick]

Without a recipe the defaults of :class:`fedllm.edge.recipe.EdgeRecipe` are used; they
are the study (``recipes/edge/fashion_mnist_cloned_kd.yaml`` spells them out). ``workload: vision``
writes ``edge_study.{json,md,png}``; ``workload: lm`` writes ``edge_lm.{json,md,png}``.

The vision study is :func:`run_edge_study`: the paper's variants (:func:`study_variants`, each an
edge recipe changed by :meth:`EdgeRecipe.with_values`) and the baselines (core only, synchronous
FedAvg), per seed, over Algorithm 1 of :mod:`fedllm.edge.vision`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from fedllm.config import RecipeError
from fedllm.data.vision import VisionData
from fedllm.edge.recipe import EdgeRecipe, load_edge_recipe
from fedllm.edge.vision import accuracy, make_splits, run_edge_learning, run_sync_fedavg, train_core
from fedllm.metrics.edge_report import LM_JSON, STUDY_JSON, summarize, write_edge_report, write_lm_report

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the vision study


def study_variants(base: EdgeRecipe) -> list[tuple[str, str, EdgeRecipe]]:
    """(group, name, recipe) for the paper's Figure 5 (transfer), 7 (lag) and 8 (noise), plus memory
    under label-skewed edges. Each group's first variant is its reference."""
    cpp = base.with_values({"distill.teacher_init": "clone", "distill.memory": 1, "distill.ensemble": 1,
                            "edges.lags": [], "edges.never_return": [], "edges.noisy": []})
    d, count = base.distill, cpp.edges.count
    n, m = d.ensemble if d.ensemble > 1 else 3, d.memory if d.memory > 1 else 3
    late, noisy, alpha = count // 4, count // 2, base.edges.alpha or 0.3
    j = min(4, count - 1 - late)
    skew = cpp.with_values({"edges.alpha": alpha})
    return [
        ("transfer", "CPP: clone of the core", cpp),
        ("transfer", "IsPP: independent init", cpp.with_values({"distill.teacher_init": "independent"})),
        ("transfer", "IPP: independent init, core-pretrained",
         cpp.with_values({"distill.teacher_init": "independent_pretrained"})),
        ("transfer", f"CPP + ensemble n={n}", cpp.with_values({"distill.ensemble": n})),
        ("transfer", f"CPP + memory M={m}", cpp.with_values({"distill.memory": m})),
        ("transfer", f"CPP + ensemble n={n} + memory M={m}",
         cpp.with_values({"distill.ensemble": n, "distill.memory": m})),
        ("lag", "no delay", cpp),
        ("lag", f"edge {late} lagged by {j}, used", cpp.with_values({"edges.lags": [{"edge": late, "by": j}]})),
        ("lag", f"edge {late} lagged, omitted", cpp.with_values({"edges.never_return": [late]})),
        ("noise", "clean", cpp),
        ("noise", f"edge {noisy} noisy p=0.5", cpp.with_values({"edges.noisy": [{"edge": noisy, "p": 0.5}]})),
        ("noise", f"edge {noisy} noisy p=1.0", cpp.with_values({"edges.noisy": [{"edge": noisy, "p": 1.0}]})),
        ("non-iid", f"Dirichlet α={alpha}: CPP, M=1", skew),
        ("non-iid", f"Dirichlet α={alpha}: CPP + memory M={m}", skew.with_values({"distill.memory": m})),
        ("non-iid", f"Dirichlet α={alpha}: CPP + memory M={count}", skew.with_values({"distill.memory": count})),
    ]


def describe(recipe: EdgeRecipe) -> str:
    """A short name of one run's configuration (the table's variant column)."""
    d, e = recipe.distill, recipe.edges
    parts = [{"clone": "CPP", "independent": "IsPP", "independent_pretrained": "IPP"}[d.teacher_init]]
    parts += [f"ensemble n={d.ensemble}"] * (d.ensemble > 1) + [f"memory M={d.memory}"] * (d.memory > 1)
    parts += [f"edge {x.edge} lagged by {x.by}" for x in e.lags] + [f"edge {x} omitted" for x in e.never_return]
    parts += [f"edge {x.edge} noisy p={x.p}" for x in e.noisy]
    parts += [f"Dirichlet α={e.alpha}"] * (e.alpha > 0)
    return " + ".join(parts)


def _study_one_seed(recipe: EdgeRecipe, data: VisionData) -> list[dict]:
    """The study for one recipe run with its (first) seed: the baselines and every variant."""
    t0, splits, single = time.perf_counter(), make_splits(recipe, data), recipe.study.kind == "single"
    core = train_core(recipe, data, splits)
    acc = accuracy(recipe, core, data.test_x[splits.test], data.test_y[splits.test])
    rows = [{"group": "baseline", "variant": "core only (Phase 0)", "position": 0, "acc": acc,
             "time_s": time.perf_counter() - t0}]
    done: list[tuple[EdgeRecipe, list[dict]]] = []  # identical variants run once (recipes hold lists: no hash)
    for group, name, variant in [("run", describe(recipe), recipe)] if single else study_variants(recipe):
        curve = next((c for r, c in done if r == variant), None)
        if curve is None:
            curve = run_edge_learning(variant, data, core_state=core)
            done.append((variant, curve))
            log.info("seed %d  %-8s %-45s final acc %.4f", recipe.seed, group, name, curve[-1]["acc"])
        rows += [{"group": group, "variant": name, **r} for r in curve]
    rounds = recipe.study.fedavg_rounds
    name = f"sync FedAvg ({rounds} rounds x {recipe.edges.count} edges)"
    rows += [{"group": "baseline", "variant": name, "position": r["round"], **r}
             for r in run_sync_fedavg(recipe, data, rounds, core_state=core)]
    return [{"seed": recipe.seed, **r} for r in rows]


def run_edge_study(recipe: EdgeRecipe, data: VisionData) -> dict:
    """Run :func:`study_variants` (``study.kind: single``: the recipe alone, group "run") and the
    baselines (core only, sync FedAvg for ``study.fedavg_rounds``) for each of ``study.seeds``,
    sharing one Phase-0 core per seed and running identical variants once.

    Returns the raw result (config: the recipe's values, seeds, fedavg_rounds, variants with their
    recipes' values, rows), JSON-ready; the tables and plots are built from it by
    :mod:`fedllm.metrics.edge_report`.
    """
    seeds = list(recipe.study.seeds)
    rows = [r for s in seeds for r in _study_one_seed(recipe.with_values({"study.seeds": [s]}), data)]
    chosen = [("run", describe(recipe), recipe)] if recipe.study.kind == "single" else study_variants(recipe)
    variants = [{"group": g, "variant": n, "config": c.to_dict()} for g, n, c in chosen]
    return {"config": recipe.to_dict(), "seeds": seeds, "fedavg_rounds": recipe.study.fedavg_rounds,
            "variants": variants, "rows": rows}


# ----------------------------------------------------------------------------- one recipe, one command


def _write_json(result: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


def run_recipe(recipe: EdgeRecipe, out: str | Path, quick: bool = False, plots: bool = True) -> Path:
    """Run the recipe's workload, write its raw result and report to ``out``; the report's .md path."""
    import torch  # noqa: PLC0415

    recipe = recipe.quick() if quick else recipe
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(recipe.study.threads)
    if recipe.workload == "lm":
        from fedllm.edge.lm import run_edge_lm  # noqa: PLC0415

        _write_json(run_edge_lm(recipe), out / LM_JSON)
        return write_lm_report(out, plots)
    from fedllm.data.vision import DEFAULT_ROOT, load_fashion_mnist  # noqa: PLC0415

    root = recipe.vision.data_root or DEFAULT_ROOT
    try:
        data = load_fashion_mnist(root)
    except FileNotFoundError as exc:
        raise RecipeError("vision.data_root", str(exc)) from None
    result = run_edge_study(recipe, data)
    result["summary"] = summarize(result["rows"])
    _write_json(result, out / STUDY_JSON)
    return write_edge_report(out, plots)


def edge_command(path: str, overrides: list[str], out: str, quick: bool = False, check: bool = False) -> int:
    """``fedllm edge``: validate (``check``) or run an edge recipe; a RecipeError reaches the CLI."""
    recipe = load_edge_recipe(path, overrides)
    if check:
        print(f"ok: {path} (name={recipe.name}, workload={recipe.workload}, study={recipe.study.kind}, "
              f"{recipe.edges.count} edges)")
        return 0
    print(run_recipe(recipe, out, quick).read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedllm.studies.edge",
                                     description="Asynchronous edge learning by cloned KD: the paper's study.")
    parser.add_argument("--recipe", help="edge recipe YAML (default: the study's defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. distill.memory=3 study.seeds=[0]")
    parser.add_argument("--out", default="runs/edge_study", help="folder for the result files")
    parser.add_argument("--quick", action="store_true", help="reduced CI-size run (seconds)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        report = run_recipe(load_edge_recipe(args.recipe, args.overrides), args.out, args.quick)
    except RecipeError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(report.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
