"""The demo corpus: instruction pairs built at run time from the installed ``coralmap`` package.

coralmap is a mental-health knowledge library (the GradualDiff-Fed paper's own domain). Its text is
CC-BY-NC-4.0, so the repository ships none of it: the pairs are derived here, from the installed
package, each time they are needed. Every entry yields a definition question; behaviours add their
observable criteria and exclusions; each ``distinguish_from`` boundary yields a contrast question.
The ``topic`` column (the entry type) gives realistic non-IID clients under a natural partition.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PAIRS_VERSION = 1  # bump when the pair construction below changes (invalidates the caches)

_FIRST_SENTENCES = re.compile(r"(.+?[.!?])(\s|$)")


def _sentences(text: str, n: int) -> str:
    """The first ``n`` sentences of ``text`` (keeps responses short enough for small contexts)."""
    text = " ".join(text.split())
    out, rest = [], text
    for _ in range(n):
        m = _FIRST_SENTENCES.match(rest)
        if not m:
            out.append(rest)
            break
        out.append(m.group(1))
        rest = rest[m.end():]
        if not rest:
            break
    return " ".join(s for s in out if s).strip()


def coralmap_records() -> list[dict[str, Any]]:
    """Instruction pairs ``{id, prompt, response, topic, kind}`` from the installed library.

    Parsing the library's ~850 YAML entries takes 10-60 s, so the derived pairs are cached per
    installed version under the user's cache (``$FEDLLM_CACHE``), never in the repository. A
    damaged cache file is rebuilt (with a warning).
    """
    try:
        from importlib.metadata import version

        import coralmap
    except ImportError as exc:  # pragma: no cover - exercised only on a broken install
        raise FileNotFoundError(
            "data.builtin: the coralmap package is not installed (pip install coralmap)"
        ) from exc
    from fedllm.models.llm import cache_root

    cache = cache_root() / f"coralmap-{version('coralmap')}-pairs-v{PAIRS_VERSION}.json"
    if cache.is_file():
        cached = _read_cache(cache)
        if cached is not None:
            return cached
        log.warning("fedllm's cache %s is damaged (not a JSON list of instruction pairs); rebuilding it", cache)
    records = _build_records(coralmap)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, cache)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return records


def _read_cache(path: Path) -> list[dict[str, Any]] | None:
    """The cached pairs, or None when the file is damaged (cut short, garbled, edited)."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    keys = ("id", "prompt", "response", "topic", "kind")
    ok = isinstance(records, list) and records and all(
        isinstance(r, dict) and all(isinstance(r.get(k), str) for k in keys) for r in records)
    return records if ok else None


def _build_records(coralmap) -> list[dict[str, Any]]:
    entries = [e.contract_fields(mode="json") for e in coralmap.load().all_entries()]
    labels = {e["id"]: e["label"] for e in entries}
    records: list[dict[str, Any]] = []

    def add(entry: dict[str, Any], kind: str, prompt: str, response: str) -> None:
        if response.strip():
            records.append({"id": f"{entry['id']}:{kind}", "prompt": prompt,
                            "response": response, "topic": entry["type"], "kind": kind})

    for e in entries:
        label, topic = e["label"], e["type"].replace("_", " ")
        add(e, "define", f"In the mental-health knowledge library, what is the {topic} "
                         f"\"{label}\"?", _sentences(e.get("definition", ""), 2))
        body = e.get("body") or {}
        if isinstance(body.get("observable_criteria"), str):
            add(e, "criteria", f"How would you recognise this {topic}: \"{label}\"?",
                _sentences(body["observable_criteria"], 2))
        if isinstance(body.get("exclusions"), str):
            add(e, "exclusions", f"What does not count as \"{label}\"?", _sentences(body["exclusions"], 2))
        for k, d in enumerate(e.get("distinguish_from") or []):
            other = labels.get(d.get("neighbor", ""))
            if other and d.get("boundary"):
                add(e, f"contrast{k}", f"How is \"{label}\" different from \"{other}\"?",
                    _sentences(d["boundary"], 2))
    return records
