"""The ``fedllm`` command: run, compare, validate and report recipes; export, generate and chat with a run.

Process-wide settings (logging, warning filters, library verbosity) are set here and only here.
Every failure ends with one line on stderr (``fedllm: error: ...``), never a traceback. Exit codes:

- 0: done; the result can be read as one.
- 2: bad input, named with its field or file (and line): a recipe, a data file, a model file, a
  run directory given to ``report``/``export``; for ``report`` also a file it could not write
  (e.g. no space left on device).
- 3: the run stopped itself or ended with a result that cannot be trusted (nothing trained, no
  round applied, a non-finite final eval loss).
- 4: ``run``/``compare`` (or another command writing files) could not write its files, e.g. no
  space left on device. A run stopped this way has no new ``summary.json`` unless only its report
  failed (``summary.json`` is the last run file written; a directory without it is unfinished).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import warnings
from pathlib import Path

from fedllm.config import RecipeError, load_recipe, one_line
from fedllm.errors import IntegrityError

EXIT_BAD_INPUT = 2
EXIT_UNTRUSTED = 3  # the run stopped itself: what it would report cannot be trusted (e.g. nothing trained)
EXIT_WRITE = 4  # the run could not write its files (e.g. the disk is full): it has no new summary.json
READING = ("validate", "report", "audit")  # commands whose OS errors are about their input: exit 2


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import lightning.pytorch  # noqa: F401  (it sets its own log level on import; override after)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "peft", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
        logging.getLogger(name).propagate = False
    logging.getLogger("fedllm").setLevel(logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors follow the same contract as recipe errors: one line, exit 2."""

    def error(self, message: str):
        if message.startswith("the following arguments are required: recipe"):  # `fedllm validate` alone
            usage = " ".join(self.format_usage().removeprefix("usage: ").split())
            message = f"a recipe path is required (usage: {usage})"
        raise RecipeError(self.prog, message)


def _parser() -> argparse.ArgumentParser:
    from fedllm import __version__

    p = _Parser(prog="fedllm", description="Federated fine-tuning of 4-bit LoRA LMs.")
    p.add_argument("--version", action="version", version=f"fedllm {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "train one mode (recipe `mode`, or --mode)"),
                        ("compare", "run federated, centralized and local on the same partition"),
                        ("validate", "check a recipe and its data without training")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("recipe", help="recipe YAML")
        sp.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. federation.rounds=2 lora.r=8 "
                        "(relative paths from the working directory; the recipe's own from its folder)")
        if name == "validate":
            sp.add_argument("--explain", action="store_true", help="list every field: value and meaning")
            sp.add_argument("--recipe-only", action="store_true",
                            help="check the recipe alone, without reading its data (by default the data is "
                            "loaded, checked row by row and partitioned as a run would)")
        else:
            sp.add_argument("--out", help="root folder for run directories (default: recipe output.dir)")
            sp.add_argument("--quiet", action="store_true",
                            help="no progress bars (there are none anyway when the output is not a terminal)")
        if name == "run":
            sp.add_argument("--mode", choices=("federated", "centralized", "local"))
            sp.add_argument("--resume", action="store_true",
                            help="continue the run in the run directory from its last checkpoint (federated and "
                                 "centralized: after its last round; local: after its last finished client)")
            sp.add_argument("--engine", choices=("inprocess", "flower"),
                            help="federated engine (default: recipe federation.engine); flower: Flower simulation")
        if name == "compare":
            sp.add_argument("--resume", action="store_true",
                            help="continue an interrupted compare: a mode that finished with this recipe is kept, "
                                 "the others continue from their last checkpoint")
    rp = sub.add_parser("report", help="rebuild report.md and plots from a run directory, or a compare "
                        "directory's comparison and reports")
    rp.add_argument("run_dir", help="a run directory (<output.dir>/<name>/<mode>) or a compare directory "
                    "(<output.dir>/<name>)")
    au = sub.add_parser("audit", help="the privacy audit of a finished federated run with canaries "
                        "(privacy.audit.canaries): membership AUCs and a lower bound on epsilon")
    au.add_argument("run_dir", help="a finished federated run directory (<output.dir>/<name>/federated)")
    _use_parsers(sub)
    ep = sub.add_parser("edge", help="asynchronous edge learning by cloned KD from an edge recipe (recipes/edge/)")
    ep.add_argument("recipe", help="edge recipe YAML")
    ep.add_argument("overrides", nargs="*", help="dotted overrides, e.g. distill.memory=3 study.kind=single")
    ep.add_argument("--out", default="runs/edge", help="folder for the result files (default: runs/edge)")
    ep.add_argument("--quick", action="store_true", help="reduced CI-size run")
    ep.add_argument("--check", action="store_true", help="validate the edge recipe without running it")
    return p


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _use_parsers(sub) -> None:
    """export, generate and chat: use a finished LM run (its config.yaml and adapter/)."""
    xp = sub.add_parser("export", help="copy the adapter with a real base name, or --merge it into a "
                        "full-precision model that transformers loads on its own")
    xp.add_argument("run_dir", help="a finished run directory (<output.dir>/<name>/<mode>)")
    xp.add_argument("--out", required=True, help="new or empty directory to write")
    xp.add_argument("--merge", action="store_true", help="merge the adapter into an fp32 base; save model + tokenizer")
    xp.add_argument("--merge-base", choices=("run", "original"), default="run",
                    help="run: the base as the run computed with it (NF4-rounded for nf4 runs; reproduces "
                         "the run's eval loss); original: the full-precision checkpoint")
    xp.add_argument("--cluster", type=int, help="a clustered run (federation.clusters): export cluster J's "
                    "model instead of the headline one")
    gp = sub.add_parser("generate", help="greedy answers of a run's model to prompts, as JSONL")
    gp.add_argument("run_dir", help="a finished run directory (<output.dir>/<name>/<mode>)")
    src = gp.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    src.add_argument("--file", help='JSONL of prompts: a string or {"prompt": ...} per line')
    gp.add_argument("--out", help="answers JSONL, one {prompt, response} per line (default: stdout)")
    _decoding_flags(gp, "nf4")
    cp = sub.add_parser("chat", help="talk to a run's model on stdin (/exit or end of input quits)")
    cp.add_argument("run_dir", help="a finished run directory (<output.dir>/<name>/<mode>)")
    _decoding_flags(cp, "merged")


def _decoding_flags(sp, weights: str) -> None:
    """generate and chat: answer length, the loop guards (fedllm.decoding) and the model's form."""
    sp.add_argument("--weights", choices=("nf4", "merged"), default=weights,
                    help=f"nf4: the run's 4-bit base + adapter, the path it evaluated; merged: the same NF4-rounded "
                    f"weights in one fp32 model, several times faster per token on a CPU (default {weights})")
    sp.add_argument("--max-new-tokens", type=_positive, default=128, help="answer length limit (default 128)")
    sp.add_argument("--repetition-penalty", type=float, default=1.15,
                    help="divide the logit of a token the answer already used by this (default 1.15; 1: off)")
    sp.add_argument("--no-repeat-ngram", type=int, default=4, metavar="N",
                    help="never repeat an N-token sequence within an answer (default 4; 0: off)")


def _use_command(args) -> int:
    if args.command == "export":
        from fedllm.export import export

        out = export(args.run_dir, args.out, merge=args.merge, merge_base=args.merge_base, cluster=args.cluster)
        print(f"{'merged model' if args.merge else 'adapter'}: {out}")
        return 0
    from fedllm.decoding import Decoding
    from fedllm.serve import chat_command, generate_command

    decoding = Decoding(args.max_new_tokens, args.repetition_penalty, args.no_repeat_ngram)
    if args.command == "generate":
        return generate_command(args.run_dir, args.prompt, args.file, args.out, decoding, args.weights)
    return chat_command(args.run_dir, decoding, weights=args.weights)


def _print_ratios(root) -> None:
    """``fedllm compare``: federated / centralized and local / federated perplexity, paired intervals."""
    import json  # noqa: PLC0415

    from fedllm.metrics.report import ratio_lines  # noqa: PLC0415

    try:
        table = json.loads((root / "comparison.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    for line in ratio_lines(table if isinstance(table, dict) else {}):
        print(line.removeprefix("- "))


def _print_table(summaries: dict[str, dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fedllm results (held-out split)")
    vision = any(s["final"].get("accuracy") is not None for s in summaries.values())
    quality = ("accuracy",) if vision else ("perplexity", "BLEU")
    for col in ("mode", "rounds", "eval loss (start→end)", *quality, "bytes up", "time s"):
        table.add_column(col)
    for mode, s in summaries.items():
        i, f = s["initial"], s["final"]
        nan = set(s.get("nonfinite_final", []))

        def cell(block: dict, key: str, spec: str, final: bool = True, nan: set = nan) -> str:
            v = block.get(key)
            return "NaN" if final and key in nan else "–" if v is None else format(v, spec)

        cells = [cell(f, "accuracy", ".4f")] if vision else [cell(f, "perplexity", ".2f"), cell(f, "bleu", ".2f")]
        table.add_row(mode, str(s["rounds"]), f"{cell(i, 'eval_loss', '.3f', False)} → {cell(f, 'eval_loss', '.3f')}",
                      *cells, f"{s['total_bytes_up']:,}", f"{s['total_time_s']:.1f}")
    Console().print(table)


def _verdict(summaries: dict[str, dict]) -> int:
    """0 when every mode's result can be read as one; else one line per mode and exit 3."""
    bad = {m: s["status"] for m, s in summaries.items() if s.get("status", "ok") != "ok"}
    for mode, status in bad.items():
        print(f"fedllm: error: {mode}: {status}", file=sys.stderr)
    return EXIT_UNTRUSTED if bad else 0


def _validate(recipe, args) -> int:
    """``fedllm validate``: the recipe, then (unless ``--recipe-only``) its data as a run loads it."""
    if args.explain:
        from fedllm.config import explain

        print("\n".join(explain(recipe)))
    line = (f"ok: {args.recipe} (name={recipe.name}, mode={recipe.mode}, "
            f"{recipe.partition.num_clients} clients, {recipe.federation.rounds} rounds)")
    if not args.recipe_only:
        from fedllm.experiments import load_data

        data = load_data(recipe)
        if recipe.data.streaming:  # a run meets a bad row only when it reads it: validate reads them all now
            data.check_rows()
        sizes = [len(data.client_examples(k)) for k in range(recipe.partition.num_clients)]
        each = f"{min(sizes)}" if min(sizes) == max(sizes) else f"{min(sizes)}-{max(sizes)}"
        line += f"; data: {sum(sizes)} training examples, {each} per client"
        names = data.partition_json().get("client_names")  # partition natural: which value is which client
        if names:
            line += "\nclients: " + ", ".join(f"{k} = {n} ({size})" for k, (n, size) in enumerate(zip(names, sizes)))
    print(line)
    return 0


def _os_error(exc: OSError) -> str:
    """One line for an OS error: the file, and what went wrong in the OS's words."""
    what = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc)).lower()
    where = exc.filename if exc.filename is not None else "fedllm"
    return one_line(f"{where}: {what}")


def main(argv: list[str] | None = None) -> int:
    command = None
    try:
        parser = _parser()
        args, extra = parser.parse_known_args(argv)
        command = args.command
        # overrides may also follow options (`fedllm run R --out X a=b`): argparse leaves them over
        if extra and (any(e.startswith("-") for e in extra) or not hasattr(args, "overrides")):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if extra:
            args.overrides = [*args.overrides, *extra]
        _quiet_libraries()
        if args.command == "edge":
            from fedllm.studies.edge import edge_command

            return edge_command(args.recipe, args.overrides, args.out, args.quick, args.check)
        if args.command == "audit":  # exit 2 for a run without canaries, 3 for a violated claim
            from fedllm.federation.audit_report import audit_command

            return audit_command(args.run_dir)
        if args.command == "report":
            from fedllm.metrics.report import rebuild

            for path in rebuild(Path(args.run_dir)):
                print(path)
            return 0
        if args.command in ("export", "generate", "chat"):
            return _use_command(args)
        recipe = load_recipe(args.recipe, args.overrides)
        if args.command == "validate":
            return _validate(recipe, args)
        from fedllm import api  # run and compare are the Python API's (fedllm.run / fedllm.compare)

        if args.command == "run":
            result = api.run(args.recipe, *args.overrides, out=args.out, mode=args.mode, resume=args.resume,
                             engine=args.engine, progress=not args.quiet)
            summaries = {result.mode: result.summary}
            _print_table(summaries)
            print(f"run directory: {result.dir}")
            return _verdict(summaries)
        else:
            comparison = api.compare(args.recipe, *args.overrides, out=args.out, resume=args.resume,
                                     progress=not args.quiet)
            summaries = {m: r.summary for m, r in comparison.runs.items()}
            print(f"comparison: {comparison.dir / 'comparison.md'}")
            _print_ratios(comparison.dir)
        _print_table(summaries)
        return _verdict(summaries)
    except RecipeError as exc:
        print(f"fedllm: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except FileNotFoundError as exc:
        print(f"fedllm: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # e.g. the disk filled up while writing the run's files
        if command in READING:
            print(f"fedllm: error: {_os_error(exc)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        stopped = "; the run stopped before writing all of its files (a run directory without summary.json " \
            "is unfinished: free space and rerun, or --resume from its last checkpoint)" \
            if command in ("run", "compare") else ""
        print(f"fedllm: error: {_os_error(exc)}{stopped}", file=sys.stderr)
        return EXIT_WRITE
    except IntegrityError as exc:
        print(f"fedllm: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_UNTRUSTED


if __name__ == "__main__":
    sys.exit(main())
