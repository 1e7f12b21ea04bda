"""Exactly-once sampling across pre-emption (SIGKILL at random points) and across separate data-loading processes.

This is the property whose absence made the paper's F7+ curve bumpy (Smith et al. 2023, §2): a restarted run must see
every example of every epoch exactly once.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SIZE = 150  # examples per epoch
BATCH = 16
NUM_EXAMPLES = 2 * SIZE + 75  # 2.5 epochs, 24 steps, last batch padded

CONSUMER = textwrap.dedent(
    f"""
    import json, os, sys, time

    from convscale_cli.data import AugmentConfig, train_loader
    from convscale_plugins.datasets import shapes

    out, process_index, process_count, delay = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    loader = train_loader(
        shapes.open_split("train", size={SIZE}, resolution=8),
        global_batch_size={BATCH},
        resolution=8,
        seed=7,
        num_examples={NUM_EXAMPLES},
        process_index=process_index,
        process_count=process_count,
        augment=AugmentConfig(crop="resize", flip=False),
    )
    path = os.path.join(out, f"progress-{{process_index}}.json")
    resume = os.path.join(out, "resume.json")
    consumed = []
    if os.path.exists(path):
        saved = json.load(open(path))
        loader.set_state(saved["state"])
        consumed = saved["ids"]
    elif os.path.exists(resume):
        loader.set_state(json.load(open(resume)))
    for batch in loader:
        consumed.extend(int(i) for i, m in zip(batch["id"], batch["mask"]) if m > 0)
        time.sleep(delay)  # stands in for the training step, so kills land between and inside saves
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({{"state": loader.get_state(), "ids": consumed}}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a kill leaves the previous or the new checkpoint, never half of one
    """
)


def _run(script: Path, out: Path, *args: object) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, str(script), str(out), *map(str, args)], env=env)


def _check_epochs(ids: list[int]) -> None:
    assert len(ids) == NUM_EXAMPLES
    for start in range(0, NUM_EXAMPLES, SIZE):
        chunk = ids[start : start + SIZE]
        assert len(set(chunk)) == len(chunk), f"an example repeats within epoch {start // SIZE}"
        if len(chunk) == SIZE:
            assert sorted(chunk) == list(range(SIZE))


@pytest.mark.slow
def test_sigkill_at_random_points_keeps_every_epoch_exactly_once(tmp_path: Path):
    script = tmp_path / "consume.py"
    script.write_text(CONSUMER)
    progress = tmp_path / "progress-0.json"
    rng = random.Random(0)

    def step() -> int:
        try:
            return json.loads(progress.read_text())["state"]["step"]
        except FileNotFoundError:
            return 0

    steps_at_kill = []
    for _ in range(3):
        proc = _run(script, tmp_path, 0, 1, 0.05)
        # Kill after a random number of new batches plus a random fraction of a step, i.e. anywhere in the loop:
        # while fetching, "training", or writing the checkpoint.
        target = step() + rng.randint(1, 5)
        deadline = time.monotonic() + 30
        while step() < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))
        assert proc.poll() is None, "the consumer finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        steps_at_kill.append(step())
    assert _run(script, tmp_path, 0, 1, 0.0).wait(timeout=60) == 0
    saved = json.loads(progress.read_text())
    assert 0 < steps_at_kill[0] < steps_at_kill[-1] < saved["state"]["step"]
    assert saved["state"]["step"] == -(-NUM_EXAMPLES // BATCH)
    _check_epochs(saved["ids"])


@pytest.mark.slow
def test_two_processes_read_disjoint_shards_and_resume_with_a_new_process_count(tmp_path: Path):
    script = tmp_path / "consume.py"
    script.write_text(CONSUMER)
    # Phase 1 (in this process, to save a start-up): one host consumes 5 global batches and is pre-empted.
    from convscale_plugins.datasets import shapes

    from convscale_cli.data import AugmentConfig, train_loader

    loader = train_loader(
        shapes.open_split("train", size=SIZE, resolution=8),
        global_batch_size=BATCH,
        resolution=8,
        seed=7,
        num_examples=NUM_EXAMPLES,
        augment=AugmentConfig(crop="resize", flip=False),
    )
    first_ids: list[int] = []
    for batch in loader:
        first_ids.extend(batch["id"].tolist())
        if loader.step == 5:
            break
    (tmp_path / "resume.json").write_text(json.dumps(loader.get_state()))
    # Phase 2: the run continues on two hosts; each reads only its half of every global batch.
    procs = [_run(script, tmp_path, index, 2, 0.0) for index in range(2)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    shards = [json.loads((tmp_path / f"progress-{i}.json").read_text())["ids"] for i in range(2)]
    # Reassemble the global order: each global batch is process 0's half then process 1's half.
    half = BATCH // 2
    merged: list[int] = []
    positions = [0, 0]
    for step in range(5, -(-NUM_EXAMPLES // BATCH)):
        for index in range(2):
            real = max(0, min(half, NUM_EXAMPLES - step * BATCH - index * half))
            merged.extend(shards[index][positions[index] : positions[index] + real])
            positions[index] += real
    assert positions == [len(shards[0]), len(shards[1])]
    _check_epochs(first_ids + merged)
