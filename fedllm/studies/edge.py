"""The cloned-KD edge study: one command from an edge recipe to its table, plot and raw numbers.

    python -m fedllm.studies.edge --out docs/edge_study            # the measured study (~10 min CPU)
    python -m fedllm.studies.edge --out /tmp/edge --quick          # CI size (seconds)
    fedllm edge recipes/edge/fashion_mnist_cloned_kd.yaml [overrides] [--out DIR] [--quick]

Without a recipe the defaults of :class:`fedllm.federation.edge_recipe.EdgeRecipe` are used; they
are the study (``recipes/edge/fashion_mnist_cloned_kd.yaml`` spells them out). ``workload: vision``
writes ``edge_study.{json,md,png}``; ``workload: lm`` writes ``edge_lm.{json,md,png}``.

The vision study is :func:`run_edge_study`: the paper's variants (:func:`study_variants`) and the
baselines (core only, synchronous FedAvg), per seed, over Algorithm 1 of :mod:`fedllm.federation.edge`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from fedllm.config import RecipeError
from fedllm.data.vision import VisionData
from fedllm.federation.edge import (
    EdgeStudyConfig,
    accuracy,
    make_splits,
    run_edge_learning,
    run_sync_fedavg,
    train_core,
)
from fedllm.federation.edge_recipe import EdgeRecipe, load_edge_recipe
from fedllm.metrics.edge_report import LM_JSON, STUDY_JSON, summarize, write_edge_report, write_lm_report

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the vision study


def study_variants(base: EdgeStudyConfig) -> list[tuple[str, str, EdgeStudyConfig]]:
    """(group, name, config) for the paper's Figure 5 (transfer), 7 (lag) and 8 (noise), plus memory
    under label-skewed edges. Each group's first variant is its reference."""
    cpp = replace(base, teacher_init="clone", memory=1, ensemble=1, lags=(), never_return=(), noisy_edges=())
    n, m = base.ensemble if base.ensemble > 1 else 3, base.memory if base.memory > 1 else 3
    late, noisy, alpha = cpp.num_edges // 4, cpp.num_edges // 2, base.edge_alpha or 0.3
    j = min(4, cpp.num_edges - 1 - late)
    skew = replace(cpp, edge_alpha=alpha)
    return [
        ("transfer", "CPP: clone of the core", cpp),
        ("transfer", "IsPP: independent init", replace(cpp, teacher_init="independent")),
        ("transfer", "IPP: independent init, core-pretrained", replace(cpp, teacher_init="independent_pretrained")),
        ("transfer", f"CPP + ensemble n={n}", replace(cpp, ensemble=n)),
        ("transfer", f"CPP + memory M={m}", replace(cpp, memory=m)),
        ("transfer", f"CPP + ensemble n={n} + memory M={m}", replace(cpp, ensemble=n, memory=m)),
        ("lag", "no delay", cpp),
        ("lag", f"edge {late} lagged by {j}, used", replace(cpp, lags=((late, j),))),
        ("lag", f"edge {late} lagged, omitted", replace(cpp, never_return=(late,))),
        ("noise", "clean", cpp),
        ("noise", f"edge {noisy} noisy p=0.5", replace(cpp, noisy_edges=((noisy, 0.5),))),
        ("noise", f"edge {noisy} noisy p=1.0", replace(cpp, noisy_edges=((noisy, 1.0),))),
        ("non-iid", f"Dirichlet α={alpha}: CPP, M=1", skew),
        ("non-iid", f"Dirichlet α={alpha}: CPP + memory M={m}", replace(skew, memory=m)),
        ("non-iid", f"Dirichlet α={alpha}: CPP + memory M={cpp.num_edges}", replace(skew, memory=cpp.num_edges)),
    ]


def describe(cfg: EdgeStudyConfig) -> str:
    """A short name of one run's configuration (the table's variant column)."""
    parts = [{"clone": "CPP", "independent": "IsPP", "independent_pretrained": "IPP"}[cfg.teacher_init]]
    parts += [f"ensemble n={cfg.ensemble}"] * (cfg.ensemble > 1) + [f"memory M={cfg.memory}"] * (cfg.memory > 1)
    parts += [f"edge {e} lagged by {j}" for e, j in cfg.lags] + [f"edge {e} omitted" for e in cfg.never_return]
    parts += [f"edge {e} noisy p={p}" for e, p in cfg.noisy_edges]
    parts += [f"Dirichlet α={cfg.edge_alpha}"] * (cfg.edge_alpha > 0)
    return " + ".join(parts)


def _study_one_seed(cfg: EdgeStudyConfig, data: VisionData, fedavg_rounds: int, single: bool) -> list[dict]:
    t0, splits = time.perf_counter(), make_splits(cfg, data)
    core = train_core(cfg, data, splits)
    acc = accuracy(cfg, core, data.test_x[splits.test], data.test_y[splits.test])
    rows = [{"group": "baseline", "variant": "core only (Phase 0)", "position": 0, "acc": acc,
             "time_s": time.perf_counter() - t0}]
    done: dict[EdgeStudyConfig, list[dict]] = {}
    for group, name, variant in [("run", describe(cfg), cfg)] if single else study_variants(cfg):
        if variant not in done:
            done[variant] = run_edge_learning(variant, data, core_state=core)
            log.info("seed %d  %-8s %-45s final acc %.4f", cfg.seed, group, name, done[variant][-1]["acc"])
        rows += [{"group": group, "variant": name, **r} for r in done[variant]]
    name = f"sync FedAvg ({fedavg_rounds} rounds x {cfg.num_edges} edges)"
    rows += [{"group": "baseline", "variant": name, "position": r["round"], **r}
             for r in run_sync_fedavg(cfg, data, fedavg_rounds, core_state=core)]
    return [{"seed": cfg.seed, **r} for r in rows]


def run_edge_study(base_cfg: EdgeStudyConfig, data: VisionData, seeds: list[int] | None = None,
                   fedavg_rounds: int = 3, single: bool = False) -> dict:
    """Run :func:`study_variants` (``single``: ``base_cfg`` alone, group "run") and the baselines
    (core only, sync FedAvg) for each seed (default: the config's), sharing one Phase-0 core per
    seed and running identical configs once.

    Returns the raw result (config, seeds, fedavg_rounds, variants, rows), JSON-ready; the tables and
    plots are built from it by :mod:`fedllm.metrics.edge_report`.
    """
    seeds = list(seeds) if seeds else [base_cfg.seed]
    rows = [r for s in seeds for r in _study_one_seed(replace(base_cfg, seed=s), data, fedavg_rounds, single)]
    chosen = [("run", describe(base_cfg), base_cfg)] if single else study_variants(base_cfg)
    variants = [{"group": g, "variant": n, "config": asdict(c)} for g, n, c in chosen]
    return {"config": asdict(base_cfg), "seeds": seeds, "fedavg_rounds": fedavg_rounds,
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
        from fedllm.federation.edge_lm import run_edge_lm  # noqa: PLC0415

        _write_json(run_edge_lm(recipe), out / LM_JSON)
        return write_lm_report(out, plots)
    from fedllm.data.vision import DEFAULT_ROOT, load_fashion_mnist  # noqa: PLC0415

    root = recipe.vision.data_root or DEFAULT_ROOT
    try:
        data = load_fashion_mnist(root)
    except FileNotFoundError as exc:
        raise RecipeError("vision.data_root", str(exc)) from None
    result = run_edge_study(recipe.study_config(), data, seeds=recipe.study.seeds,
                            fedavg_rounds=recipe.study.fedavg_rounds, single=recipe.study.kind == "single")
    result = {"recipe": recipe.to_dict(), **result, "summary": summarize(result["rows"])}
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
