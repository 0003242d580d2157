"""``train.devices`` > 1: each client fit of an LM experiment runs on N processes (Lightning DDP).

The engine's own process is rank 0: it keeps its shared model, callbacks and run files, and it
alone returns the update Δ. Ranks 1..N-1 are helper processes that :class:`RankPool` starts
(``spawn``) at the experiment's first fit; each builds the same experiment from the same recipe
(so the same 4-bit base, loaded once per process, the same LoRA layers) and then waits for fits.
For each fit rank 0 opens a TCP store on 127.0.0.1, sends every helper the :class:`RankJob`
(examples, start state, steps, seed, drift term), and all ranks join one process group (gloo on
CPU, NCCL on GPUs), run :func:`fit_rank` (:mod:`fedllm.client.ddp`) and close the group again, so
nothing distributed outlives a fit.

Why not Lightning's own launchers: ``strategy="ddp"`` re-runs the command line in each child
(every rank would run the whole federation, its server and its run files), and ``ddp_spawn`` pickles
the model (the 4-bit base) to fresh processes on every ``fit`` and brings back only the weights,
not the callbacks' Δ, step losses and gradient witness. One pool per experiment keeps the bases
loaded across rounds and clients and lets the engine stay a single process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing as mp
import os
import sys
import threading
import time
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist

from fedllm.algorithms.drift import DriftTerm
from fedllm.client.ddp import DDPCausalLMModule, SharedModelDDP, fit_module_ddp, rank_loader, rank_seed
from fedllm.client.fit import FitStats
from fedllm.client.lm import FederatedRoundCallback
from fedllm.config import Recipe, RecipeError, one_line
from fedllm.data.text import Example
from fedllm.types import StateDict

log = logging.getLogger(__name__)
GROUP_TIMEOUT = timedelta(minutes=30)  # a collective that waits longer than this fails (gloo's default)
STARTUP_S = 1800.0  # a helper loads the base model and the data before it reports ready


@dataclasses.dataclass(frozen=True)
class RankJob:
    """One client fit, as every rank needs it (``port``: rank 0's TCP store for this fit)."""

    examples: list[Example]
    start: StateDict
    steps: int
    seed: int
    rnd: int
    grad_term: DriftTerm | None = None
    port: int = 0


def check_devices(devices: int, accelerator: str) -> None:
    """``train.devices`` against this machine: one CPU core or one CUDA device per process."""
    if devices <= 1:
        return
    gpu = accelerator == "gpu"
    have = torch.cuda.device_count() if gpu else len(os.sched_getaffinity(0))
    if devices > have:
        raise RecipeError("train.devices", f"{devices} training processes need {devices} "
                          f"{'CUDA devices' if gpu else 'CPU cores'}; this machine has {have}")


def rank_devices(accelerator: str, world: int) -> list[torch.device]:
    """Each rank's device: the CPU for all, or rank 0 on the current GPU and the others on the next ones."""
    if accelerator != "gpu":
        return [torch.device("cpu")] * world
    first = torch.cuda.current_device()
    order = [first, *(i for i in range(torch.cuda.device_count()) if i != first)]
    return [torch.device("cuda", i) for i in order[:world]]


def fit_rank(exp, job: RankJob, rank: int, devices: list[torch.device], callbacks: list) -> FitStats:
    """Rank ``rank``'s part of one client fit on the open process group (``callbacks`` include the
    :class:`~fedllm.client.lm.FederatedRoundCallback` that loads ``job.start`` and computes Δ)."""
    t = exp.recipe.train
    torch.manual_seed(rank_seed(job.seed, rank))  # this rank's LoRA dropout masks
    loader = rank_loader(job.examples, t.batch_size, len(devices), rank, exp.tokenizer.pad_token_id, job.seed,
                         t.length_bucketing)
    module = DDPCausalLMModule(exp.model, exp.state, t, job.steps, job.grad_term, rnd=job.rnd,
                               rounds=exp.recipe.federation.rounds)
    return fit_module_ddp(module, loader, job.steps, callbacks, SharedModelDDP(rank, devices), t.max_grad_norm,
                          t.grad_accum, t.precision)


@contextlib.contextmanager
def _group(store, rank: int, devices: list[torch.device]):
    backend = "nccl" if devices[0].type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=len(devices), timeout=GROUP_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _threads(n: int | None):
    """``n`` intra-op threads for the block (the CPU's cores shared by the ranks), then as before."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _helper_main(build, recipe: Recipe, rank: int, devices: list[torch.device], threads: int | None, link) -> None:
    """A helper rank's process: :func:`_serve`, then exit at once (it writes no file; finalizing the
    interpreter with torch, transformers and a model loaded takes seconds)."""
    _serve(build, recipe, rank, devices, threads, link)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _serve(build, recipe: Recipe, rank: int, devices: list[torch.device], threads: int | None, link) -> None:
    """Build the experiment once (``build``: rank 0's experiment class), then run each :class:`RankJob`
    this rank is sent, until it is sent ``None`` or rank 0's process is gone."""
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        if devices[rank].type == "cuda":  # this rank sees its own GPU only, as cuda:0 (where the loader puts the base)
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            index = devices[rank].index or 0
            os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[index] if visible else str(index)
            devices = [torch.device("cuda", 0) if r == rank else d for r, d in enumerate(devices)]
        for name in ("lightning", "lightning.pytorch", "fedllm"):
            logging.getLogger(name).setLevel(logging.ERROR)  # rank 0 speaks for the fit
        with contextlib.suppress(ImportError):  # transformers' bars: a thread lock, not a semaphore os._exit leaks
            import tqdm  # noqa: PLC0415 - transformers' dependency, not fedllm's

            tqdm.tqdm.set_lock(threading.RLock())
            from transformers.utils import logging as hf_logging  # noqa: PLC0415

            hf_logging.disable_progress_bar()  # rank 0 shows the loading bars
        exp = build(recipe)
    except BaseException as exc:  # noqa: BLE001 - reported to rank 0 as one line
        link.send(("error", one_line(f"{type(exc).__name__}: {exc}")))
        return
    link.send(("ready", None))
    while True:
        try:
            job = link.recv()
        except EOFError:  # the engine's process is gone
            return
        if job is None:
            return
        try:
            store = dist.TCPStore("127.0.0.1", job.port, len(devices), is_master=False, timeout=GROUP_TIMEOUT)
            with _group(store, rank, devices):
                fit_rank(exp, job, rank, devices, [FederatedRoundCallback(job.start)])
            link.send(("done", None))
        except BaseException as exc:  # noqa: BLE001 - a failed rank reports and leaves; rank 0 restarts the pool
            link.send(("error", one_line(f"{type(exc).__name__}: {exc}")))
            return


def _stop(procs: list, links: list) -> None:
    for link in links:
        with contextlib.suppress(OSError, ValueError):
            link.send(None)
            link.close()
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():  # stuck in a collective of a failed fit
            proc.terminate()
            proc.join(timeout=10)


class RankPool:
    """Ranks 1..N-1 of an experiment's fits: started at the first fit, stopped with the experiment.

    A fit that fails on any rank stops the pool (its process group may be half-way through a
    collective); the next fit starts a fresh one.
    """

    def __init__(self, recipe: Recipe, accelerator: str, build) -> None:
        self.recipe, self.world, self.build = recipe, recipe.train.devices, build
        self.devices = rank_devices(accelerator, self.world)
        self.threads = max(1, torch.get_num_threads() // self.world) if accelerator != "gpu" else None
        self.procs: list = []
        self.links: list = []
        self._finalizer = None

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # a fresh interpreter: no forked threads, CUDA or locks
        for rank in range(1, self.world):
            parent, child = ctx.Pipe()
            args = (self.build, self.recipe, rank, self.devices, self.threads, child)
            proc = ctx.Process(target=_helper_main, args=args, name=f"fedllm-rank{rank}", daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.links.append(parent)
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.links)
        t0 = time.perf_counter()
        for rank in range(1, self.world):
            self._expect(rank, "ready", STARTUP_S)
        log.info("train.devices: %d helper ranks ready in %.1f s", self.world - 1, time.perf_counter() - t0)

    def _expect(self, rank: int, kind: str, timeout: float) -> None:
        link, proc = self.links[rank - 1], self.procs[rank - 1]
        deadline = time.monotonic() + timeout
        while not link.poll(0.2):
            if not proc.is_alive():
                raise RuntimeError(f"train.devices: rank {rank} exited (code {proc.exitcode}) before it was {kind}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"train.devices: rank {rank} was not {kind} after {timeout:.0f} s")
        try:
            got, detail = link.recv()
        except EOFError:
            got, detail = "exit", f"it exited (code {proc.exitcode}) before it was {kind}"
        if got != kind:
            raise RuntimeError(f"train.devices: rank {rank} failed: {detail}")

    def close(self) -> None:
        """Stop the helper ranks (the next fit starts new ones)."""
        if self._finalizer is not None:
            self._finalizer()
        self.procs, self.links, self._finalizer = [], [], None

    def fit(self, exp, job: RankJob, callbacks: list) -> FitStats:
        """Rank 0's fit of ``job`` with every helper rank; ``callbacks`` are rank 0's alone."""
        try:
            if self.procs and not all(p.is_alive() for p in self.procs):
                self.close()  # a helper died between fits: start the ranks afresh
            if not self.procs:
                self._start()
            store = dist.TCPStore("127.0.0.1", 0, self.world, is_master=True, timeout=GROUP_TIMEOUT,
                                  wait_for_workers=False)
            job = dataclasses.replace(job, port=store.port)
            for link in self.links:
                link.send(job)
            with _threads(self.threads), _group(store, 0, self.devices):
                fitted = fit_rank(exp, job, 0, self.devices, callbacks)
            for rank in range(1, self.world):
                self._expect(rank, "done", GROUP_TIMEOUT.total_seconds())
            return fitted
        except BaseException as exc:
            why = self._helper_errors()
            self.close()
            if why and isinstance(exc, Exception):
                raise RuntimeError(f"train.devices: {why}") from exc
            raise

    def _helper_errors(self) -> str:
        """What the helper ranks reported after a failed fit (a rank's own error, one line each)."""
        lines = []
        for rank, (link, proc) in enumerate(zip(self.links, self.procs), 1):
            with contextlib.suppress(OSError, EOFError):
                if link.poll(1.0):
                    got, detail = link.recv()
                    if got == "error":
                        lines.append(f"rank {rank} failed: {detail}")
                        continue
            if not proc.is_alive():
                lines.append(f"rank {rank} exited (code {proc.exitcode}) during the fit")
        return "; ".join(lines)
