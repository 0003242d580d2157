"""The headline at convergence (issue 34): federated vs centralized vs local once each has trained to its best.

The fixed-budget study (:mod:`fedllm.studies.gradualdiff`) stopped after 0.25 epochs. Here every
mode trains on ``recipes/studies/gradualdiff.yaml`` (SmolLM2-135M NF4 + LoRA on every linear layer,
coralmap, 5 clients) in whole data passes (``train.local_epochs``), scores a validation split
carved from the training data every round (``data.validation_fraction``) and stops when its own
validation loss has not improved for ``--patience`` evaluations (cap ``--cap-epochs``). The modes
are compared at their best-validation rounds on the same held-out examples (paired, from each run's
``eval_nll.json``), and the same runs give the loss against data passes.

A *part* is one run: (phase, partition, seed, mode, variant, work, lr).

1. **Pilots** (seed 0, ``--pilot-partitions``): ``--pilot-epochs`` of training at every client
   learning rate of ``--lrs`` for centralized, local and GradualDiff (FedAvg of deltas), at each
   local work per round of ``--works`` (federated; centralized and local train one epoch per
   round). The rate with the lowest validation loss is chosen per (partition, mode, variant, work);
   a partition without pilots takes the first pilot partition's choice. Where that rate is the
   largest (or smallest) one a row tried, the row gets a pilot one step further along the 1-3 ladder
   (1e-3 -> 3e-3 -> 1e-2), up to ``--extend`` steps past each end of the grid, so that a chosen rate
   is not the edge of what was tried unless the page says so.
2. **Server pilots**: FedAvgM and FedAdam at GradualDiff's chosen client rate, over
   ``--fedavgm-lrs`` / ``--fedadam-lrs``; the server rate with the lowest validation loss is kept.
3. **Full runs** at the chosen rates, ``--seeds`` for federated and centralized, ``--local-seeds``
   for local, with early stopping.
4. **Continuations** (``--continue-to E``): a federated or centralized full run that reached the cap
   without early stopping goes on from its last checkpoint to E epochs (:func:`full_phase`).

Every finished part is recorded in ``<out>/parts/`` (one JSON each: its recipe, rows, summary and
per-example losses) and skipped when its recipe is unchanged; an interrupted part resumes from its
checkpoint (federated and centralized after their last round, local after its last finished client).
``--plan`` prints the parts and an estimate of the CPU hours (tokens over a measured tokens/s). ``--quick`` runs the whole plan on the tiny model in about a minute (CI)::

    nice -n 19 python -m fedllm.studies.convergence --out docs/convergence_study [--precision bf16]
        [--plan] [--quick] [--report-only] [--readme docs/results/convergence.md] [--headline README.md]
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fedllm.studies import finished_run, machine_line, parts_folder, quiet_process, recorded, study_parser

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "studies" / "gradualdiff.yaml"
PARTITIONS = {"iid": ["partition.method=iid"], "natural": ["partition.method=natural", "partition.column=topic"]}
PAPER_LRS = (1e-5, 3e-5, 5e-5, 8e-5, 1e-4)  # the GradualDiff-Fed paper's grid; larger ones added below
LRS = (*PAPER_LRS, 2e-4, 5e-4, 1e-3)
VALIDATION = 0.1  # of each client's training examples
# BLEU is scored once a full run has finished, on its best-validation and last adapters (a greedy
# generation every round would cost more than the training of a quarter-epoch round); pilots skip it.
BLEU_SAMPLES = 32
QUICK = ["model.preset=tiny", "model.quantization=none", "lora.target_modules=[q_proj,v_proj]",
         "partition.num_clients=3", "data.max_examples=45", "data.eval_size=9", "eval.bleu_samples=2",
         "eval.max_new_tokens=4"]
# The cost model of --plan: the study data (1,621 training + 200 held-out coralmap examples, the fixed-budget
# study's partition.json) at 104 tokens an example (benchmarks: 6 steps of batch 4 = 2,491 tokens), and
# docs/benchmarks.md's fp32 client rates on 2 shared cores (training 91.6, evaluation 337.4 tokens/s).
STUDY_EXAMPLES, TOKENS_PER_EXAMPLE, TRAIN_TPS, EVAL_TPS = 1821, 104, 91.6, 337.4


@dataclass(frozen=True)
class Settings:
    """What one invocation plans (the command line's knobs)."""

    partitions: tuple[str, ...] = ("iid", "natural")
    pilot_partitions: tuple[str, ...] = ("iid",)
    seeds: tuple[int, ...] = (0, 1)
    local_seeds: tuple[int, ...] = (0,)
    lrs: tuple[float, ...] = LRS
    works: tuple[float, ...] = (0.25, 1.0)
    server_lrs: dict[str, tuple[float, ...]] = field(default_factory=lambda: {"fedavgm": (0.5, 1.0),
                                                                              "fedadam": (1e-3, 1e-2)})
    pilot_epochs: float = 0.5
    cap_epochs: float = 10.0
    patience: int = 2
    precision: str = "32"
    full_federated: str = "all"  # all: every federated family at every work; best: the pilots' best one
    extend: int = 2  # client-rate pilots allowed past each end of ``lrs`` when the best rate is an end
    continue_to: float | None = None  # epochs a full run the cap cut off (no early stop) continues to
    quick: bool = False


QUICK_SETTINGS = Settings(partitions=("iid",), seeds=(0,), lrs=(1e-3, 1e-2), works=(1.0,),
                          server_lrs={"fedadam": (1e-2,)}, pilot_epochs=1.0, cap_epochs=2.0, patience=1, extend=1,
                          quick=True)


@dataclass(frozen=True)
class Part:
    phase: str  # pilot | full
    partition: str
    seed: int
    mode: str
    variant: str  # "-" (centralized, local), gradualdiff, fedavgm@<server lr>, fedadam@<server lr>
    work: float  # epochs of local work per round
    lr: float
    cap: float | None = None  # a full run's epochs when not the settings' cap (a continued run); not in its key

    @property
    def name(self) -> str:
        variant = {"-": self.mode[:4]}.get(self.variant, self.variant.replace("@", ""))
        return f"conv_{self.phase}_{self.partition}_s{self.seed}_{variant}_w{self.work:g}_lr{self.lr:g}"

    @property
    def key(self) -> str:
        return f"{self.name}__{self.mode}"


def work_of(part: Part, s: Settings) -> float:
    """Epochs a round trains: the part's work, or a pilot's whole budget when that is smaller."""
    return min(part.work, s.pilot_epochs) if part.phase == "pilot" else part.work


def rounds_of(part: Part, s: Settings) -> int:
    epochs = s.pilot_epochs if part.phase == "pilot" else part.cap or s.cap_epochs
    return max(1, math.ceil(epochs / work_of(part, s) - 1e-9))


def part_overrides(part: Part, s: Settings) -> list[str]:
    server = ["server.optimizer=none"] if part.variant in ("-", "gradualdiff") else [
        f"server.optimizer={part.variant.split('@')[0]}", f"server.lr={part.variant.split('@')[1]}"]
    pilot = part.phase == "pilot"
    return [f"name={part.name}", f"seed={part.seed}", *PARTITIONS[part.partition], "federation.algorithm=gradualdiff",
            *server, "train.local_steps=10", f"train.local_epochs={work_of(part, s):g}", f"train.lr={part.lr:g}",
            f"train.precision={s.precision}", f"federation.rounds={rounds_of(part, s)}", "eval.every=1",
            f"data.validation_fraction={VALIDATION}", f"eval.patience={'null' if pilot else s.patience}",
            f"output.save_adapter={'false' if pilot else 'true'}", *(QUICK if s.quick else []),
            "eval.bleu_samples=0"]


def part_recipe(part: Part, s: Settings):
    from fedllm.config import load_recipe  # noqa: PLC0415  (heavy imports only when running)

    return load_recipe(RECIPE, part_overrides(part, s))


# ----------------------------------------------------------------------------- the plan


def pilot_parts(s: Settings) -> list[Part]:
    """Client-rate pilots: centralized and local one epoch a round, GradualDiff at every work."""
    out = []
    for partition in s.pilot_partitions:
        for lr in s.lrs:
            out += [Part("pilot", partition, 0, mode, "-", 1.0, lr) for mode in ("centralized", "local")]
            out += [Part("pilot", partition, 0, "federated", "gradualdiff", w, lr) for w in s.works]
    return out


def ladder_step(lr: float, up: bool) -> float:
    """The next rate of the 1-3 ladder (..., 1e-4, 3e-4, 1e-3, 3e-3, ...) above or below ``lr``
    (more than 1.4x away, so 2e-4 steps up to 3e-4, not to itself)."""
    ladder = [float(f"{m}e{k}") for k in range(-12, 3) for m in (1, 3)]
    return min(x for x in ladder if x > lr * 1.4) if up else max(x for x in ladder if x < lr / 1.4)


def edge_parts(s: Settings, records: dict[str, dict], pilots: list[Part]) -> list[Part]:
    """One more client-rate pilot for every row of ``pilots`` whose best rate is the largest (smallest)
    it tried: a step further along the ladder, while the row has fewer than ``s.extend`` pilots past
    that end of ``s.lrs``. Rows whose edge pilot is not recorded yet get nothing (their best is unknown)."""
    rows: dict[tuple, list[Part]] = {}
    for p in pilots:
        if p.variant in ("-", "gradualdiff"):
            rows.setdefault((p.partition, p.mode, p.variant, p.work), []).append(p)
    out = []
    for (partition, mode, variant, work), parts in rows.items():
        if any(p.key not in records for p in parts):
            continue
        best = choose(records, parts).get(choice_key(partition, mode, variant, work))
        if best is None:
            continue
        tried = sorted(p.lr for p in parts)
        for up, end, past in ((True, tried[-1], sum(x > max(s.lrs) for x in tried)),
                              (False, tried[0], sum(x < min(s.lrs) for x in tried))):
            if best["lr"] == end and past < s.extend:
                out.append(Part("pilot", partition, 0, mode, variant, work, ladder_step(end, up)))
    return out


def client_pilots(s: Settings, runs: Path, out: Path, pick) -> tuple[list[Part], dict[str, dict]]:
    """The grid's pilots, then the edge pilots :func:`edge_parts` asks for, until none is asked for
    (or, reading only what is recorded, until one asked for is not recorded)."""
    parts = pilot_parts(s)
    records = pick(parts, s, runs, out)
    while more := [p for p in edge_parts(s, records, parts) if p not in parts]:
        got = pick(more, s, runs, out)
        parts += more
        records.update(got)
        if len(got) < len(more):
            break
    return parts, records


def server_pilot_parts(s: Settings, chosen: dict[str, float]) -> list[Part]:
    """FedAvgM / FedAdam pilots at GradualDiff's chosen client rate (once that is known)."""
    out = []
    for partition in s.pilot_partitions:
        for w in s.works:
            c = chosen.get(choice_key(partition, "federated", "gradualdiff", w))
            if c is not None:
                out += [Part("pilot", partition, 0, "federated", f"{opt}@{slr:g}", w, c["lr"])
                        for opt, grid in s.server_lrs.items() for slr in grid]
    return out


def choice_key(partition: str, mode: str, variant: str, work: float) -> str:
    return f"{partition}|{mode}|{variant}|{work:g}"


def choose(records: dict[str, dict], parts: list[Part]) -> dict[str, Any]:
    """Per (partition, mode, variant, work): the client rate (and per optimizer the server rate)
    whose pilot reached the lowest validation loss; ties go to the smaller rate."""
    best: dict[str, tuple[float, float, str]] = {}
    for p in parts:
        rec = records.get(p.key)
        val = (rec or {}).get("summary", {}).get("best", {}).get("val_loss")
        if val is None or not math.isfinite(val):
            continue
        family = p.variant.split("@")[0]
        k = choice_key(p.partition, p.mode, family, p.work)
        if k not in best or (val, p.lr) < best[k][:2]:
            best[k] = (val, p.lr, p.variant)
    return {k: {"lr": v[1], "variant": v[2], "val_loss": v[0]} for k, v in best.items()}


def full_parts(s: Settings, chosen: dict[str, Any]) -> list[Part]:
    """The full runs at the chosen rates (a partition without pilots takes the first pilot partition's).

    With ``full_federated="best"`` only the federated recipe (family and work) whose pilot reached the
    lowest validation loss runs in full; the others are reported from their pilots."""
    out = []
    families = ["gradualdiff", *s.server_lrs]
    for partition in s.partitions:
        source = partition if partition in s.pilot_partitions else s.pilot_partitions[0]
        fed = [(w, chosen[k]) for w in s.works for fam in families
               if (k := choice_key(source, "federated", fam, w)) in chosen]
        if s.full_federated == "best" and fed:
            fed = [min(fed, key=lambda wc: (wc[1].get("val_loss", math.inf), wc[0]))]
        for seed in s.seeds:  # the federated / centralized pair first, so each part finished adds a ratio sooner
            central, local = (chosen.get(choice_key(source, mode, "-", 1.0)) for mode in ("centralized", "local"))
            out += [Part("full", partition, seed, "centralized", "-", 1.0, central["lr"])] if central else []
            out += [Part("full", partition, seed, "federated", c["variant"], w, c["lr"]) for w, c in fed]
            out += [Part("full", partition, seed, "local", "-", 1.0, local["lr"])] if local and seed in s.local_seeds else []
    return out


def cut_by_cap(rec: dict[str, Any]) -> bool:
    """A federated or centralized full run that ended at its cap without early stopping (its validation
    loss had not gone ``eval.patience`` evaluations without improving). Local runs are not continued: a
    local run resumes after its last finished client, and every client of a finished run is finished."""
    return rec["part"]["phase"] == "full" and rec["part"]["mode"] != "local" and not rec["summary"].get("stopped_early")


def continued(part: Part, s: Settings) -> Part:
    return replace(part, cap=s.continue_to)


def full_phase(fulls: list[Part], s: Settings, runs: Path, out: Path, pick) -> tuple[list[Part], dict[str, dict]]:
    """The full runs; then, with ``s.continue_to``, each one the cap cut off goes on from its last
    checkpoint to ``continue_to`` epochs (the same part key: its record becomes the continued run's).
    A part whose record is such a continuation is read as it (with or without the flag). Returns the
    parts as they stand and their records."""
    folder = parts_folder(out, s.quick)

    def as_recorded(p: Part) -> Part:
        path = folder / f"{p.key}.json"
        cap = json.loads(path.read_text(encoding="utf-8")).get("part", {}).get("cap") if path.is_file() else None
        return c if cap and recorded(path, part_recipe(c := replace(p, cap=cap), s)) is not None else p

    fulls = [as_recorded(p) for p in fulls]
    records = pick(fulls, s, runs, out)
    more = {p.key: continued(p, s) for p in fulls if s.continue_to and (p.cap or s.cap_epochs) < s.continue_to
            and p.key in records and cut_by_cap(records[p.key])}
    records.update(pick(list(more.values()), s, runs, out))
    return [more.get(p.key, p) for p in fulls], records


def estimate_hours(part: Part, s: Settings, train_tps: float, eval_tps: float) -> float:
    """Upper bound of a part's CPU hours (every round to the cap; patience usually stops sooner)."""
    examples = 45 if s.quick else STUDY_EXAMPLES
    held = 9 if s.quick else 200
    train = (examples - held) * (1 - VALIDATION) * TOKENS_PER_EXAMPLE
    scored = (held + (examples - held) * VALIDATION) * TOKENS_PER_EXAMPLE * (5 if part.mode == "local" else 1)
    rounds = rounds_of(part, s)
    return (rounds * work_of(part, s) * train / train_tps + (rounds + 1) * scored / eval_tps) / 3600


# ----------------------------------------------------------------------------- running


def run_parts(parts: list[Part], s: Settings, runs: Path, out: Path) -> dict[str, dict]:
    """Run every part not yet recorded (one experiment per (partition, seed): one base model);
    returns every recorded part of ``parts`` by key."""
    from fedllm.experiments import make_experiment  # noqa: PLC0415  (heavy imports only when running)
    from fedllm.federation.modes import run_centralized, run_federated, run_local  # noqa: PLC0415

    folder = parts_folder(out, s.quick)
    folder.mkdir(parents=True, exist_ok=True)
    records, exps = {}, {}
    for part in parts:
        recipe = part_recipe(part, s)
        if (rec := recorded(folder / f"{part.key}.json", recipe)) is not None:
            records[part.key] = rec
            continue
        path = runs / recipe.name / part.mode
        if not finished_run(path, recipe):
            (path / BLEU_FILE).unlink(missing_ok=True)  # scored a run that now goes on (a continued one)
            group = (part.partition, part.seed)
            if group not in exps:
                exps.clear()  # one base model in memory at a time
                exps[group] = remember_evaluations(make_experiment(recipe))
            exp = exps[group]
            exp.recipe = recipe  # same data split and model; rates, optimizer and rounds differ
            t0, c0 = time.perf_counter(), time.process_time()
            runner = {"federated": run_federated, "centralized": run_centralized, "local": run_local}[part.mode]
            resume = any((path / "checkpoints").glob("*"))  # an interrupted part goes on, a continued one too
            runner(exp, out=str(runs), resume=resume)
            timing = path / "study_time.json"  # summed over the sessions that finished (an interrupted one is lost)
            spent = json.loads(timing.read_text()) if resume and timing.is_file() else {}
            timing.write_text(json.dumps({"wall_s": spent.get("wall_s", 0.0) + time.perf_counter() - t0,
                                          "cpu_s": spent.get("cpu_s", 0.0) + time.process_time() - c0}))
        if part.phase == "full" and not (path / BLEU_FILE).is_file():
            group = (part.partition, part.seed)
            if group not in exps:
                exps.clear()
                exps[group] = make_experiment(recipe)
            exps[group].recipe = recipe
            score_bleu(exps[group], part, path, BLEU_SAMPLES if not s.quick else 2)
        records[part.key] = record(part, recipe, path, folder)
        best = records[part.key]["summary"].get("best") or {}
        print(f"  {part.key}: best val_loss {best.get('val_loss')} at round {best.get('round')}", flush=True)
    return records


BLEU_FILE = "study_bleu.json"


def remember_evaluations(exp):
    """``exp.evaluate`` answered from memory for a state it has already scored.

    Every part of a (partition, seed) starts from the same adapter, so its round-0 evaluation (the
    held-out and validation splits, about two minutes of SmolLM2 on two cores, five times over in
    local mode) is the same numbers each time. Keyed by the state's bytes (sha256), so any other
    state is scored afresh; evaluation has no randomness (no dropout, greedy BLEU)."""
    import copy  # noqa: PLC0415
    import hashlib  # noqa: PLC0415

    import torch  # noqa: PLC0415

    scored: dict[str, Any] = {}
    evaluate = exp.evaluate

    def remembered(state):
        h = hashlib.sha256(repr((exp.recipe.eval, exp.recipe.data)).encode())
        for name in sorted(state):
            t = state[name].detach().contiguous().cpu()
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
        key = h.hexdigest()
        if key not in scored:
            scored[key] = evaluate(state)
        return copy.deepcopy(scored[key])

    exp.evaluate = remembered
    return exp


def score_bleu(exp, part: Part, path: Path, samples: int) -> None:
    """BLEU on the first ``samples`` held-out prompts of a finished full run's best-validation and last
    adapters (local mode: the mean over the clients' best adapters; its last is the best client's),
    written to the run directory's ``study_bleu.json``. Each adapter's held-out loss must equal the one
    the run logged for it, or this raises (the wrong files were read)."""
    from safetensors.torch import load_file  # noqa: PLC0415

    from fedllm.client.evaluate import evaluate  # noqa: PLC0415

    summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    e = exp.recipe.eval

    def bleu_of(folder: Path, logged: float | None) -> float:
        exp.state.set(load_file(str(folder / "adapter_model.safetensors")))
        res = evaluate(exp.model, exp.tokenizer, exp.data.eval_examples, e.batch_size, samples, e.max_new_tokens)
        if logged is not None and abs(res.eval_loss - logged) > 1e-3 * max(1.0, abs(logged)):
            raise RuntimeError(f"{folder}: scores {res.eval_loss:.6f}, the run logged {logged:.6f}")
        return res.bleu

    best = summary.get("best") or {}
    if part.mode == "local":
        clients = sorted((path / "adapter_best").glob("client_*"), key=lambda p: int(p.name.split("_")[1]))
        best_bleu = statistics.fmean(bleu_of(c, None) for c in clients) if clients else None
        last_bleu = None
    else:
        best_bleu = bleu_of(path / "adapter_best", best.get("eval_loss")) if (path / "adapter_best").is_dir() else None
        last_bleu = bleu_of(path / "adapter", (summary.get("final") or {}).get("eval_loss"))
    (path / BLEU_FILE).write_text(json.dumps({"samples": samples, "best": best_bleu, "last": last_bleu}))


def record(part: Part, recipe, path: Path, folder: Path) -> dict[str, Any]:
    """A finished part's record (``<out>/parts/<key>.json``), from its run directory's files only."""
    from fedllm.config import dump_recipe  # noqa: PLC0415
    from fedllm.federation.rundir import read_metrics, write_json_atomic  # noqa: PLC0415

    keep = ("round", "epochs", "eval_loss", "val_loss", "perplexity", "bleu", "train_loss", "train_time_s",
            "aggregate_time_s", "eval_time_s", "clients")
    summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    timing = path / "study_time.json"
    nll = path / "eval_nll.json"
    rec = {"recipe": dump_recipe(recipe), "part": asdict(part),
           "rows": [{k: r.get(k) for k in keep if k in r} for r in read_metrics(path)],
           "summary": {k: summary.get(k) for k in ("rounds", "final", "best", "train_unit", "stopped_early", "machine")},
           "eval_nll": json.loads(nll.read_text(encoding="utf-8")) if nll.is_file() and part.phase == "full" else None,
           "bleu": json.loads((path / BLEU_FILE).read_text()) if (path / BLEU_FILE).is_file() else None,
           **(json.loads(timing.read_text()) if timing.is_file() else {})}
    write_json_atomic(folder / f"{part.key}.json", rec)
    return rec


def run_study(s: Settings, runs: Path, out: Path, execute: bool) -> dict[str, Any]:
    """The three phases in order (each needs the one before); with ``execute`` False only the
    parts already recorded are read."""
    pick = run_parts if execute else _recorded_only
    pilots, records = client_pilots(s, runs, out, pick)
    chosen = choose(records, pilots)
    records.update(pick(server_pilot_parts(s, chosen), s, runs, out))
    chosen = choose(records, pilots + server_pilot_parts(s, chosen))
    fulls, got = full_phase(full_parts(s, chosen), s, runs, out, pick)
    records.update(got)
    return {"chosen": chosen, "records": records, "full_planned": len(fulls)}


def _recorded_only(parts: list[Part], s: Settings, runs: Path, out: Path) -> dict[str, dict]:
    folder = parts_folder(out, s.quick)
    got = {p.key: recorded(folder / f"{p.key}.json", part_recipe(p, s)) for p in parts}
    return {k: v for k, v in got.items() if v is not None}


def print_plan(s: Settings, train_tps: float, eval_tps: float, runs: Path | None = None,
               out: Path | None = None) -> float:
    """The parts and their CPU-hour bound; with ``out``, which are recorded ("done") and the hours left.

    Rates not chosen yet (no pilots recorded) print as "chosen" and are estimated at the grid's first."""
    done: dict[str, dict] = {}
    pilots = pilot_parts(s)
    if out is not None:
        pilots, done = client_pilots(s, runs, out, _recorded_only)
    stand_in = {choice_key(p.partition, p.mode, p.variant, p.work): {"lr": p.lr, "variant": p.variant}
                for p in pilots if p.lr == s.lrs[0]}
    chosen = {**stand_in, **choose(done, pilots)}
    servers = server_pilot_parts(s, chosen)
    if out is not None:
        done.update(_recorded_only(servers, s, runs, out))
    fam = {choice_key(p.partition, p.mode, p.variant.split("@")[0], p.work): {"lr": p.lr, "variant": p.variant}
           for p in servers}
    fulls = full_parts(s, {**chosen, **fam, **choose(done, pilots + servers)})
    if out is not None:  # a continuation not yet run is not done, though its part's key holds the run at the cap
        fulls, got = full_phase(fulls, s, runs, out, _recorded_only)
        done.update({p.key: got[p.key] for p in fulls if p.key in got and (
            p.cap is None or recorded(parts_folder(out, s.quick) / f"{p.key}.json", part_recipe(p, s)) is not None)})
    settled = all(p.key in done for p in pilots + servers)  # every rate chosen for good
    client_settled = all(p.key in done for p in pilots)  # no edge pilot can be added
    measured = choose(done, pilots + servers)

    def rate(p: Part) -> str:
        if p.key in done or settled or (p.phase == "pilot" and "@" not in p.variant):
            return f"{p.lr:g}"
        source = p.partition if p.partition in s.pilot_partitions else s.pilot_partitions[0]
        known = choice_key(source, p.mode, p.variant.split("@")[0], p.work) in measured
        return f"chosen (so far {p.lr:g})" if known else "chosen"

    total = left = 0.0
    for title, parts in (("pilots", pilots), ("server-rate pilots", servers), ("full runs", fulls)):
        hours = [estimate_hours(p, s, train_tps, eval_tps) for p in parts]
        total += sum(hours)
        left += sum(h - (estimate_hours(replace(p, cap=None), s, train_tps, eval_tps) if p.cap else 0.0)
                    for p, h in zip(parts, hours) if p.key not in done)  # a continuation: its added rounds
        finished = sum(p.key in done for p in parts)
        print(f"{title}: {len(parts)} parts, <= {sum(hours):.1f} CPU hours" + (f"; {finished} done" if out else ""))
        for p in parts:
            print(f"  {p.partition:8s} s{p.seed} {p.mode:12s} {p.variant:14s} work {p.work:g} lr {rate(p)} "
                  f"rounds <= {rounds_of(p, s)}" + ("  (continued: the cap cut it off)" if p.cap else "")
                  + ("  done" if p.key in done else ""))
    print(f"total: {len(pilots) + len(servers) + len(fulls)} parts, <= {total:.1f} CPU hours at {train_tps:g} "
          f"training / {eval_tps:g} evaluation tokens/s (upper bound: every run to its cap)"
          + (f"; <= {left:.1f} CPU hours left" if out else ""))
    if s.continue_to:
        more = max((estimate_hours(continued(p, s), s, train_tps, eval_tps) - estimate_hours(p, s, train_tps, eval_tps)
                    for p in fulls if p.mode != "local"), default=0.0)
        print(f"--continue-to {s.continue_to:g}: a federated or centralized full run the {s.cap_epochs:g}-epoch cap "
              f"cuts off (no early stop) goes on to {s.continue_to:g} epochs, up to {more:.2f} CPU hours more each")
    if s.extend and not client_settled:
        rows = len({(p.partition, p.mode, p.variant, p.work) for p in pilot_parts(s)})
        each = max(estimate_hours(p, s, train_tps, eval_tps) for p in pilots)
        print(f"plus up to {s.extend} edge pilots per end of the grid for each of the {rows} client-rate rows "
              f"whose best rate is an end (--extend), at {each:.2f} CPU hours or less each")
    return total


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def settings_from(args) -> Settings:
    if args.quick:
        return replace(QUICK_SETTINGS, precision=args.precision, continue_to=args.continue_to)
    return Settings(partitions=tuple(args.partition or ("iid", "natural")),
                    pilot_partitions=tuple(args.pilot_partition or ("iid",)),
                    seeds=tuple(int(x) for x in _floats(args.seeds)), local_seeds=tuple(int(x) for x in _floats(args.local_seeds)),
                    lrs=_floats(args.lrs), works=_floats(args.works),
                    server_lrs={k: v for k, v in (("fedavgm", _floats(args.fedavgm_lrs)),
                                                  ("fedadam", _floats(args.fedadam_lrs))) if v},
                    pilot_epochs=args.pilot_epochs, cap_epochs=args.cap_epochs, patience=args.patience,
                    precision=args.precision, full_federated=args.full_federated, extend=args.extend,
                    continue_to=args.continue_to)


def main(argv: list[str] | None = None) -> int:
    from fedllm.studies.convergence_report import write_report  # noqa: PLC0415

    p = study_parser("convergence", __doc__)
    p.add_argument("--quick", action="store_true", help="the tiny model and a small grid (CI, about a minute)")
    p.add_argument("--plan", action="store_true", help="print the parts and the CPU-hour estimate; run nothing")
    p.add_argument("--partition", action="append", choices=sorted(PARTITIONS), help="default: both")
    p.add_argument("--pilot-partition", action="append", choices=sorted(PARTITIONS), help="default: iid")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--local-seeds", default="0")
    p.add_argument("--lrs", default=",".join(f"{x:g}" for x in LRS), help="client learning rates of the pilots")
    p.add_argument("--works", default="0.25,1", help="federated local work per round, in epochs")
    p.add_argument("--fedavgm-lrs", default="0.5,1", help="FedAvgM server rates (empty: no FedAvgM)")
    p.add_argument("--fedadam-lrs", default="0.001,0.01", help="FedAdam server rates (empty: no FedAdam)")
    p.add_argument("--pilot-epochs", type=float, default=0.5)
    p.add_argument("--cap-epochs", type=float, default=10.0)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--full-federated", default="all", choices=("all", "best"),
                   help="full runs of every federated recipe, or only the one whose pilot validated best")
    p.add_argument("--extend", type=int, default=2,
                   help="client-rate pilots allowed past each end of --lrs where the best rate is that end")
    p.add_argument("--continue-to", type=float, metavar="EPOCHS",
                   help="a federated or centralized full run that reaches --cap-epochs without early stopping goes "
                        "on from its checkpoint to EPOCHS epochs")
    p.add_argument("--precision", default="32", choices=("32", "bf16"), help="client training numerics")
    p.add_argument("--train-tps", type=float, default=TRAIN_TPS, help="--plan: measured training tokens/s")
    p.add_argument("--eval-tps", type=float, default=EVAL_TPS, help="--plan: measured evaluation tokens/s")
    p.add_argument("--headline", help="also render the block, with its plots, into this file (the README)")
    args = p.parse_args(argv)
    s = settings_from(args)
    if s.continue_to is not None and s.continue_to <= s.cap_epochs:
        p.error(f"--continue-to {s.continue_to:g} must be more than the cap's {s.cap_epochs:g} epochs")
    if args.plan:
        print_plan(s, args.train_tps, args.eval_tps, Path(args.runs), Path(args.out))
        return 0
    quiet_process()
    doc = run_study(s, Path(args.runs), Path(args.out), execute=not args.report_only)
    doc["meta"] = {"settings": {**asdict(s), "server_lrs": {k: list(v) for k, v in s.server_lrs.items()}},
                   "machine": machine_line(), "command": "python -m fedllm.studies.convergence --out " + args.out
                   + (" --quick" if args.quick else "")}
    write_report(doc, Path(args.out), [Path(f) for f in (args.readme, args.headline) if f])
    print(f"wrote {args.out}/convergence_study.md (.json, .png): {len(doc['records'])} parts recorded")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
