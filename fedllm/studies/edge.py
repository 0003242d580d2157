"""The cloned-KD edge study: one command from an edge recipe to its table, plot and raw numbers.

    python -m fedllm.studies.edge --out docs/edge_study            # the measured study (~10 min CPU)
    python -m fedllm.studies.edge --out /tmp/edge --quick          # CI size (seconds)
    fedllm edge recipes/edge/fashion_mnist_cloned_kd.yaml [overrides] [--out DIR] [--quick]

Without a recipe the defaults of :class:`fedllm.federation.edge_recipe.EdgeRecipe` are used; they
are the study (``recipes/edge/fashion_mnist_cloned_kd.yaml`` spells them out). ``workload: vision``
writes ``edge_study.{json,md,png}``; ``workload: lm`` writes ``edge_lm.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from fedllm.config import RecipeError
from fedllm.federation.edge_recipe import EdgeRecipe, load_edge_recipe
from fedllm.metrics.edge_report import LM_JSON, STUDY_JSON, summarize, write_edge_report, write_lm_report

log = logging.getLogger(__name__)


def _write_json(result: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


def run_recipe(recipe: EdgeRecipe, out: str | Path, quick: bool = False, plots: bool = True) -> Path:
    """Run the recipe's workload, write its raw result and report to ``out``; the report's .md path."""
    import torch  # noqa: PLC0415  (keeps `fedllm edge --check` light)

    recipe = recipe.quick() if quick else recipe
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(recipe.study.threads)
    if recipe.workload == "lm":
        from fedllm.federation.edge_lm import run_edge_lm  # noqa: PLC0415

        _write_json(run_edge_lm(recipe), out / LM_JSON)
        return write_lm_report(out, plots)
    from fedllm.data.vision import DEFAULT_ROOT, load_fashion_mnist  # noqa: PLC0415
    from fedllm.federation.edge import run_edge_study  # noqa: PLC0415

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
