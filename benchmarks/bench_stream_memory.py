"""Peak RSS of building and reading every client's data, in memory vs ``data.streaming``, as the
data grows from 10k to 200k rows.

A subprocess writes one parquet file per size of synthetic instruction rows (a ~150-character
prompt, a ~250-character response, a topic; pyarrow's defaults) into a temporary directory. Each
(size, mode) then runs in a fresh subprocess: import the stack a run imports, build the data as a run does (``build_text_data``
on ``recipes/tiny.yaml`` with ``data.path`` the file: the tiny preset's tokenizer, SmolLM2's, and
``data.template: alpaca``, 8 iid clients, 64 held-out rows), then read every client's examples once
through its training loader (one epoch of batches of 8) and the held-out examples once, so both
modes tokenize and collate every row. Streaming's first open of a file converts it into the Arrow
cache (here in the temporary directory): that runs in a process of its own first ("convert", the
open alone), so the streaming row is a run on a converted file, as every run after the first is.

Reported per process: peak RSS (``VmHWM``, the kernel's high-water mark of this process's RSS;
``ru_maxrss`` would not do: Linux carries the forking parent's peak over into it across exec), the
peak of its anonymous part (``RssAnon``, sampled every 10 ms) and the file-backed RSS at the end
(``RssFile``: the shared libraries, and the pages of the memory-mapped Arrow file still mapped). The
largest/smallest size ratio of the peaks is printed per mode.

    python benchmarks/bench_stream_memory.py [--sizes 10000,50000,200000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import ROOT, quiet

MODES = ("in-memory", "convert", "streaming")  # convert: streaming's first open of a file, alone
WORDS = ("coral reef water warm bleach algae fish tide current sample survey site depth light growth "
         "species recover colony nutrient ocean temperature season record measure compare report").split()


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    """``n`` synthetic prompt/response rows (a few hundred characters each) as one parquet file."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    words = np.asarray(WORDS)

    def texts(count: int) -> list[str]:
        return [" ".join(w) for w in words[rng.integers(0, len(words), (n, count))].tolist()]

    pq.write_table(pa.table({"prompt": [f"Row {i}: {t}?" for i, t in enumerate(texts(24))],
                             "response": texts(40), "topic": (np.arange(n) % 5).astype(str).tolist()}), path)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


class PeakAnon:
    """The highest ``RssAnon`` seen while running (a daemon thread samples /proc/self/status)."""

    def __init__(self, every_s: float = 0.01) -> None:
        self.peak, self.every_s, self.done = _status_mb("RssAnon"), every_s, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.done.wait(self.every_s):
            self.peak = max(self.peak, _status_mb("RssAnon"))

    def stop(self) -> float:
        self.done.set()
        self.peak = max(self.peak, _status_mb("RssAnon"))
        return self.peak


def one(path: Path, mode: str, cache: Path) -> dict:
    """Open (``convert``) or build and read the data of ``path`` once; peak memory of this process."""
    quiet()
    import fedllm.data.stream
    from fedllm.client.lm import make_loader
    from fedllm.config import load_recipe
    from fedllm.data.build import build_text_data
    from fedllm.models.llm import load_tokenizer, tokenizer_dir

    fedllm.data.stream.arrow_cache = lambda: cache  # keep the converted copies out of ~/.cache/fedllm
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", [
        "data.builtin=null", f"data.path={path}", "data.max_examples=null", "data.template=alpaca",
        "data.max_length=128", "data.eval_size=64", "partition.method=iid", "partition.column=null",
        "partition.num_clients=8", f"data.streaming={str(mode != 'in-memory').lower()}"])
    tokenizer = load_tokenizer(tokenizer_dir(recipe.model, recipe.seed), user=False)
    anon = PeakAnon()
    t0 = time.perf_counter()
    if mode == "convert":
        fedllm.data.stream.ArrowRows(path)
        return _report(anon, 0, time.perf_counter() - t0, 0.0)
    data = build_text_data(recipe, tokenizer)
    t1 = time.perf_counter()
    tokens = 0
    for k in range(recipe.partition.num_clients):
        for batch in make_loader(data.client_examples(k), 8, tokenizer.pad_token_id, seed=k):
            tokens += int(batch["attention_mask"].sum())
    tokens += sum(len(e.input_ids) for e in data.eval_examples)
    return _report(anon, tokens, t1 - t0, time.perf_counter() - t1)


def _report(anon: PeakAnon, tokens: int, build_s: float, read_s: float) -> dict:
    return {"peak_rss_mb": _status_mb("VmHWM"),
            "peak_anon_mb": anon.stop(), "file_mb_end": _status_mb("RssFile"), "tokens": tokens,
            "build_s": build_s, "read_s": read_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,50000,200000")
    ap.add_argument("--child", nargs=3, metavar=("PATH", "MODE", "CACHE"))
    ap.add_argument("--write", nargs=2, metavar=("PATH", "ROWS"))
    args = ap.parse_args()
    if args.write:
        write_rows(Path(args.write[0]), int(args.write[1]))
        return
    if args.child:
        path, mode, cache = args.child
        print(json.dumps(one(Path(path), mode, Path(cache))))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    res: dict[tuple[int, str], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'rows':>8} {'mode':>10} {'peak RSS MB':>12} {'peak anon MB':>13} {'file-backed MB':>15} "
              f"{'build s':>8} {'read s':>7} {'tokens':>11}")
        for n in sizes:
            path = Path(tmp) / f"rows{n}.parquet"
            subprocess.run([sys.executable, __file__, "--write", str(path), str(n)], check=True)
            for mode in MODES:
                out = subprocess.run([sys.executable, __file__, "--child", str(path), mode, str(Path(tmp) / "arrow")],
                                     capture_output=True, text=True, check=True)
                r = res[n, mode] = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{n:>8,} {mode:>10} {r['peak_rss_mb']:>12,.0f} {r['peak_anon_mb']:>13,.0f} "
                      f"{r['file_mb_end']:>15,.0f} {r['build_s']:>8.1f} {r['read_s']:>7.1f} {r['tokens']:>11,}")
            assert res[n, "in-memory"]["tokens"] == res[n, "streaming"]["tokens"]  # the same batches were read
    lo, hi = sizes[0], sizes[-1]
    for mode in MODES:
        rss = res[hi, mode]["peak_rss_mb"] / res[lo, mode]["peak_rss_mb"]
        anon = res[hi, mode]["peak_anon_mb"] / res[lo, mode]["peak_anon_mb"]
        print(f"{mode:>10}: peak RSS {hi:,}/{lo:,} rows = {rss:.3f}, peak anonymous RSS = {anon:.3f}")


if __name__ == "__main__":
    main()
