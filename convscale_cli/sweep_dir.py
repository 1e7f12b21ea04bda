"""What the workers of one sweep share: the runs directory, and nothing else; and how a worker waits on it.

Each cell's decision is written, by the one worker that ran the cell, to its own file
``OUT/cells/{model}-e{epochs}.{rule}.json`` (a write then a rename, so a reader never sees half of one), stamped with
the study's fingerprint: a decision of an edited study does not count as done until its cell is decided again.
``OUT/tuning.jsonl`` is rebuilt from those files in the study's cell order after every decision, so it is the same
whichever worker decided what first, and no two processes ever append to it. Lines of other decisions
(``convscale tune-lr``, another study) are kept where they were; the study's cells form one block, placed where
its first line was.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from convscale_cli import interrupts
from convscale_cli.config import to_dict
from convscale_cli.sweep import TRUNKS, StudyConfig, SweepStalled
from convscale_cli.sweep_graph import Shard, StudyGraph, cell_key
from convscale_cli.tuning import TUNING_LOG, TuneResult

CELLS = "cells"  # OUT/cells/: one decision file per cell
# Engine keys that change how a run is logged or saved, never what it computes (engine.config.MUTABLE_KEYS, the
# ones a study sets): workers may differ in them, e.g. a live terminal table switches progress lines to "plain".
_LOGGING_KEYS = frozenset({"progress", "tensorboard", "wandb", "log_every", "checkpoint_every", "checkpoint_minutes"})

Key = tuple[str, float]


def fingerprint(study: StudyConfig) -> str:
    """A digest of everything in the study that can change a decision (not ``out``, not logging settings)."""
    fields = to_dict(study)
    fields.pop("out", None)
    fields["engine"] = {k: v for k, v in (fields.get("engine") or {}).items() if k not in _LOGGING_KEYS}
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def decision_path(out: str | Path, key: Key, rule: str) -> Path:
    """``OUT/cells/{model}-e{epochs}.{rule}.json``."""
    return Path(out) / CELLS / f"{key[0].replace('/', '_')}-e{key[1]:g}.{rule}.json"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("decision"), dict) else None


def read_decisions(out: str | Path, keys: Sequence[Key], rule: str, study_print: str | None) -> dict[Key, dict]:
    """The decided cells among ``keys``: ``key -> tuning.jsonl line``; with ``study_print``, only that study's."""
    found = {}
    for key in keys:
        data = _read(decision_path(out, key, rule))
        if data is not None and (study_print is None or data.get("fingerprint") == study_print):
            found[key] = data["decision"]
    return found


def _comparable(decision: Mapping[str, Any]) -> Any:
    """A decision without its time and the trials' trained/reused status (which say when, not what)."""
    trials = [{k: v for k, v in t.items() if k != "status"} for t in decision.get("trials") or []]
    return json.dumps({**decision, "time": None, "trials": trials}, sort_keys=True)


def write_decision(out: str | Path, result: TuneResult, study_print: str) -> None:
    """Save the cell's decision; an unchanged one keeps its first time and trial statuses (a rerun changes nothing)."""
    from convscale_cli.engine.rundir import write_json

    path = decision_path(out, (result.model, float(result.epochs)), result.rule)
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result.to_dict()}
    old = _read(path)
    if old is not None and _comparable(old["decision"]) == _comparable(line):
        if old.get("fingerprint") == study_print:
            return
        line = old["decision"]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"fingerprint": study_print, "decision": line})


def rebuild_log(out: str | Path, keys: Sequence[Key], rule: str, dataset: str) -> None:
    """Rewrite ``OUT/tuning.jsonl``: the other lines as they were, the study's decided cells as one block in order.

    Workers rebuild concurrently, each by a write then a rename, so the last rename wins; each worker lists the
    decisions again after its rename and rebuilds until the list did not change, so the last rename holds every
    decision written before it.
    """
    from convscale_cli.engine.rundir import write_text

    root = Path(out)
    log = root / TUNING_LOG
    mine = {(model, dataset, round(float(epochs), 9), rule) for model, epochs in keys}
    while True:
        decisions = read_decisions(root, keys, rule, None)
        kept: list[str] = []
        block_at = None
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.is_file() else []
        for line in lines:
            if not line.strip():
                continue
            if _line_key(line) in mine:
                block_at = len(kept) if block_at is None else block_at
                continue
            kept.append(line)
        block = [json.dumps(decisions[k]) for k in keys if k in decisions]
        at = len(kept) if block_at is None else block_at
        text = "\n".join([*kept[:at], *block, *kept[at:]])
        write_text(log, text + "\n" if text else "")
        if read_decisions(root, keys, rule, None) == decisions:
            return


def _line_key(line: str) -> tuple[str, str, float, str] | None:
    try:
        entry = json.loads(line)
        epochs = float(entry["epochs"])
        return (str(entry["model"]), str(entry.get("dataset")), round(epochs, 9), str(entry["rule"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def activity(out: str | Path) -> float:
    """The newest modification time among the study's decisions, run directories and trunks (their direct files).

    A worker waiting for another worker's cell counts any change as progress: training writes its metrics and
    checkpoints as it goes.
    """
    root = Path(out)
    newest = -math.inf
    for folder in (root, root / CELLS, root / TRUNKS):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                newest = max(newest, entry.stat().st_mtime)
                if entry.is_dir() and entry.name not in (CELLS, TRUNKS):
                    newest = max([newest, *(f.stat().st_mtime for f in os.scandir(entry.path))])
            except OSError:
                continue
    return newest


def ready(key: Key, graph: StudyGraph, decided: Mapping[Key, Any]) -> bool:
    """Whether every cell ``key`` depends on is decided, and so is the run its unset settings are inherited from.

    Runs inherit unset settings (the resolution, ...) from the finished runs before them, so the first cell whose
    decision holds a finished run must be decided: normally the first cell; if all its trials failed, the next.
    """
    if any(d not in decided for d in graph.deps[key]):
        return False
    if not graph.inherits:
        return True
    for earlier in (cell_key(c) for c in graph.cells):
        if earlier == key:
            return True
        decision = decided.get(earlier)
        if decision is None:
            return False
        if any(t.get("status") != "failed" for t in decision.get("trials") or []):
            return True
    return True


def blocker(key: Key, graph: StudyGraph, decided: Mapping[Key, Any], owner: Mapping[Key, int], me: int) -> Key:
    """The undecided cell of another worker that ``key`` waits for, following the chain through this worker's own."""
    keys = [cell_key(c) for c in graph.cells]
    seen = set()
    while owner[key] == me and key not in seen:
        seen.add(key)
        pending = [d for d in graph.deps[key] if d not in decided]
        pending = pending or [k for k in keys[: keys.index(key)] if k not in decided]
        if not pending:
            break
        key = pending[0]
    return key


class Waiter:
    """Polls the runs directory while a worker waits; gives up when nothing in it changed for ``timeout`` seconds."""

    def __init__(
        self,
        out: str,
        shard: Shard,
        owner: Mapping[Key, int],
        timeout: float,
        poll: float,
        on_wait: Callable[[str], None] | None,
    ) -> None:
        self.out = out
        self.shard = shard
        self.owner = owner
        self.timeout = timeout
        self.poll = poll
        self.on_wait = on_wait
        self.reset()

    def reset(self) -> None:
        """Forget the cell waited for (this worker has just found a ready cell)."""
        self.waiting_for: Key | None = None
        self.since = 0.0  # when the directory last changed, or the wait for this cell began
        self.last_seen = -math.inf  # the directory's newest modification time then
        self.pause = min(0.05, self.poll)

    def wait(self, key: Key) -> None:
        """Sleep a little (longer each time, up to ``poll`` seconds) before the worker looks for a ready cell again.

        Raises:
            SweepStalled: the runs directory has not changed for ``timeout`` seconds of waiting for ``key``.
        """
        interrupts.check()  # a Ctrl-C while waiting stops the worker as it would between trials
        now = time.monotonic()
        seen = activity(self.out)
        if key != self.waiting_for:
            self.waiting_for, self.since, self.last_seen = key, now, seen
            self.pause = min(0.05, self.poll)
            if self.on_wait is not None:
                self.on_wait(f"waiting for {self._name(key)}")
        elif seen != self.last_seen:
            self.since, self.last_seen = now, seen
        elif now - self.since > self.timeout:
            raise SweepStalled(
                f"worker {self.shard} waited {self.timeout:g} s for {self._name(key)} and nothing in "
                f"{self.out!r} changed meanwhile: is that worker running? A worker that died resumes when its "
                f"command is run again (`shard={self.owner[key]}/{self.shard.count}`); `wait_timeout` waits longer"
            )
        time.sleep(self.pause)
        self.pause = min(self.pause * 2, self.poll)

    def _name(self, key: Key) -> str:
        return f"cell {key[0]} x {key[1]:g} epochs (worker {self.owner[key]}/{self.shard.count}'s)"
