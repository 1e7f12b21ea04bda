"""Training and evaluation loaders: exactly-once epochs, sharding, padding, resume state, augmentation determinism."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convscale_cli.data import AugmentConfig, eval_loader, train_loader
from convscale_cli.data import pipeline as pipeline_module
from convscale_cli.errors import DataError, UsageError


class ArraySource:
    """A tiny in-memory source whose image pixels encode the example id (so crops can be checked)."""

    def __init__(self, size: int, hw: tuple[int, int] = (12, 12), multi_hot: int = 0) -> None:
        self.size, self.hw, self.multi_hot = size, hw, multi_hot

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = np.full((*self.hw, 3), index % 251, np.uint8)
        if self.multi_hot:
            label = np.zeros(self.multi_hot, np.float32)
            label[index % self.multi_hot] = 1.0
            return {"image": image, "label": label, "id": index}
        return {"image": image, "label": index % 7, "id": index}


def _ids(loader) -> np.ndarray:
    return np.concatenate([b["id"][b["mask"] > 0] for b in loader])


def test_exactly_once_per_epoch_and_reshuffled():
    n = 50
    loader = train_loader(ArraySource(n), global_batch_size=16, resolution=8, seed=3, num_examples=3 * n + 10)
    assert loader.steps == math.ceil((3 * n + 10) / 16)
    ids = _ids(loader)
    assert len(ids) == 3 * n + 10
    epochs = [ids[k * n : (k + 1) * n] for k in range(3)]
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(n))
    assert len(set(ids[3 * n :].tolist())) == 10  # the partial 4th epoch repeats nothing
    assert not np.array_equal(epochs[0], epochs[1])  # a new global order every epoch
    other = _ids(train_loader(ArraySource(n), global_batch_size=16, resolution=8, seed=4, num_examples=n))
    assert not np.array_equal(other, epochs[0])


def test_fractional_epochs_are_exact_and_final_batch_is_padded():
    n = 40
    num = round(0.25 * n)
    loader = train_loader(ArraySource(n), global_batch_size=8, resolution=8, seed=0, num_examples=num)
    batches = list(loader)
    assert len(batches) == loader.steps == 2
    last = batches[-1]
    assert last["mask"].tolist() == [1.0, 1.0] + [0.0] * 6
    assert (last["id"][2:] == -1).all() and (last["image"][2:] == 0).all()
    assert batches[0]["image"].dtype == np.uint8 and batches[0]["image"].shape == (8, 8, 8, 3)
    assert batches[0]["label"].dtype == np.int32 and batches[0]["id"].dtype == np.int64
    assert batches[0]["mask"].dtype == np.float32
    assert len(set(np.concatenate([b["id"][b["mask"] > 0] for b in batches]).tolist())) == num


def test_processes_read_disjoint_slices_of_each_global_batch():
    kwargs = dict(global_batch_size=12, resolution=8, seed=5, num_examples=70)
    whole = list(train_loader(ArraySource(30), **kwargs))
    parts = [list(train_loader(ArraySource(30), process_index=i, process_count=3, **kwargs)) for i in range(3)]
    for step, batch in enumerate(whole):
        for key in ("image", "label", "id", "mask"):
            joined = np.concatenate([parts[i][step][key] for i in range(3)])
            np.testing.assert_array_equal(joined, batch[key])
    assert parts[0][0]["image"].shape[0] == 4


def test_resume_is_exact_and_allows_a_different_process_count():
    kwargs = dict(global_batch_size=8, resolution=8, seed=9, num_examples=60)
    full = list(train_loader(ArraySource(25), **kwargs))
    first = train_loader(ArraySource(25), **kwargs)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(first.get_state()))
    first.close()
    assert state["step"] == 3 and state["examples_consumed"] == 24
    shards = []
    for index in range(2):
        resumed = train_loader(ArraySource(25), process_index=index, process_count=2, **kwargs)
        resumed.set_state(state)
        shards.append(list(resumed))
    for k, batch in enumerate(full[3:]):
        np.testing.assert_array_equal(np.concatenate([shards[0][k]["id"], shards[1][k]["id"]]), batch["id"])
        np.testing.assert_array_equal(np.concatenate([shards[0][k]["image"], shards[1][k]["image"]]), batch["image"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": 10}, "seed"),
        ({"global_batch_size": 16}, "global_batch_size"),
        ({"num_examples": 61}, "num_examples"),
    ],
)
def test_resume_refuses_a_different_example_stream(change, message):
    kwargs = dict(global_batch_size=8, resolution=8, seed=9, num_examples=60)
    state = train_loader(ArraySource(25), **kwargs).get_state()
    other = train_loader(ArraySource(25), **{**kwargs, **change})
    with pytest.raises(DataError, match=message):
        other.set_state(state)


def test_bad_states_and_layouts_are_errors():
    loader = train_loader(ArraySource(10), global_batch_size=4, resolution=8, seed=0, num_examples=10)
    with pytest.raises(DataError, match="version"):
        loader.set_state({"version": 99})
    with pytest.raises(DataError, match="step 7"):
        loader.set_state({**loader.get_state(), "step": 7})
    with pytest.raises(UsageError, match="not divisible by 3 processes"):
        train_loader(ArraySource(10), global_batch_size=4, resolution=8, seed=0, num_examples=10, process_count=3)
    with pytest.raises(DataError, match="empty"):
        train_loader(ArraySource(0), global_batch_size=4, resolution=8, seed=0, num_examples=10)


def test_repeated_augmentation_draws_each_example_k_times_with_different_crops():
    n, k = 12, 3
    # A gradient image, so that different crops give different pixels.
    gradient = np.arange(16 * 16 * 3, dtype=np.uint32).reshape(16, 16, 3) % 256

    class Gradient(ArraySource):
        def __getitem__(self, index: int) -> dict[str, Any]:
            return {"image": gradient.astype(np.uint8), "label": index % 7, "id": index}

    loader = train_loader(
        Gradient(n, hw=(16, 16)),
        global_batch_size=6,
        resolution=8,
        seed=1,
        num_examples=k * n,
        augment=AugmentConfig(repeats=k),
    )
    batches = list(loader)
    ids = np.concatenate([b["id"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])
    assert sorted(ids.tolist()) == sorted(list(range(n)) * k)
    assert (ids.reshape(n, k) == ids.reshape(n, k)[:, :1]).all()  # repeats are consecutive
    assert not np.array_equal(images[0], images[1])  # independent augmentations
    assert loader.epochs == pytest.approx(1.0)


def test_augmentation_is_deterministic_in_seed_and_position():
    kwargs = dict(global_batch_size=8, resolution=10, num_examples=16)
    source = ArraySource(16, hw=(20, 24))
    a = list(train_loader(source, seed=2, **kwargs))
    b = list(train_loader(source, seed=2, **kwargs))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
    assert a[0]["image"].shape == (8, 10, 10, 3)


def test_multi_hot_labels_are_batched_as_float_and_padded_with_zeros():
    source = ArraySource(5, multi_hot=4)
    batches = list(train_loader(source, global_batch_size=4, resolution=8, seed=0, num_examples=5))
    assert batches[0]["label"].dtype == np.float32 and batches[0]["label"].shape == (4, 4)
    assert batches[1]["label"][1:].sum() == 0 and batches[1]["label"][0].sum() == 1


def test_eval_loader_is_one_ordered_padded_pass():
    source = ArraySource(10, hw=(16, 20))
    loader = eval_loader(source, global_batch_size=4, resolution=8)
    batches = list(loader)
    assert loader.steps == 3
    assert np.concatenate([b["id"] for b in batches]).tolist() == [*range(10), -1, -1]
    assert batches[-1]["mask"].tolist() == [1, 1, 0, 0]
    assert batches[0]["image"].shape == (4, 8, 8, 3)
    # Pixels encode the id: the centre crop of a constant image is that constant.
    assert (batches[1]["image"][2] == 6).all()
    shards = [
        list(eval_loader(source, global_batch_size=4, resolution=8, process_index=i, process_count=2)) for i in range(2)
    ]
    assert sorted(np.concatenate([b["id"] for s in shards for b in s]).tolist()) == [-1, -1, *range(10)]


def test_large_datasets_use_grains_index_shuffle(monkeypatch):
    # Above the table limit the order comes from grain's index_shuffle: still a bijection per epoch.
    monkeypatch.setattr(pipeline_module, "PERMUTATION_TABLE_MAX", 8)
    ids = _ids(train_loader(ArraySource(20), global_batch_size=8, resolution=8, seed=0, num_examples=40))
    assert sorted(ids[:20].tolist()) == sorted(ids[20:].tolist()) == list(range(20))
    assert not np.array_equal(ids[:20], ids[20:])


@pytest.mark.slow
def test_worker_processes_produce_the_same_batches():
    kwargs = dict(global_batch_size=8, resolution=8, seed=4, num_examples=40)
    inline = list(train_loader(ArraySource(30), **kwargs))
    loader = train_loader(ArraySource(30), worker_count=2, **kwargs)
    workers = list(loader)
    assert len(workers) == len(inline)
    for x, y in zip(inline, workers, strict=True):
        np.testing.assert_array_equal(x["id"], y["id"])
        np.testing.assert_array_equal(x["image"], y["image"])


@pytest.mark.parametrize("workers", [0, 2])
def test_passes_repeat_the_held_out_batches_from_one_live_iteration(workers: int) -> None:
    """``Loader.passes``: every evaluation of a run reads the same batches from one iteration, so ``--workers``
    processes start once per run, not once per evaluation."""
    import multiprocessing

    loader = eval_loader(ArraySource(20), global_batch_size=8, resolution=8, worker_count=workers)
    once = list(loader)
    step = loader.step
    passes = loader.passes()
    for _ in range(3):
        again = [next(passes) for _ in range(len(loader))]
        assert [b["id"].tolist() for b in again] == [b["id"].tolist() for b in once]
        np.testing.assert_array_equal(np.stack([b["image"] for b in again]), np.stack([b["image"] for b in once]))
        if workers:
            assert len(multiprocessing.active_children()) == workers  # the same processes serve the next pass
    passes.close()
    assert loader._live is None and loader.step == step  # stopped; passes never move the resume position


class BadLabelSource(ArraySource):
    """Example 3 carries ``label``; the others are fine."""

    def __init__(self, size: int, label: Any) -> None:
        super().__init__(size)
        self.label = label

    def __getitem__(self, index: int) -> dict[str, Any]:
        element = super().__getitem__(index)
        return {**element, "label": self.label} if index == 3 else element


@pytest.mark.parametrize(
    ("label", "shown"),
    [(2**40, "1099511627776"), ("cat", "'cat'"), (2.5, "2.5"), (-1, "-1"), (True, "True"), ([1, [2]], "[1, [2]]")],
)
def test_a_label_that_is_not_a_class_index_is_a_data_error_naming_the_example(label: Any, shown: str) -> None:
    """int32(2**40) raised OverflowError, int32('cat') ValueError and int32(2.5) truncated to 2 silently."""
    loader = train_loader(BadLabelSource(8, label), global_batch_size=8, resolution=8, seed=0, num_examples=8)
    with pytest.raises(DataError, match=rf"^dataset example 3: (multi-hot )?label {re.escape(shown)} is not a"):
        list(loader)


@pytest.mark.slow
def test_a_bad_label_in_a_worker_process_is_one_data_error_without_a_traceback(capfd: pytest.CaptureFixture) -> None:
    loader = train_loader(
        BadLabelSource(16, 2**40), global_batch_size=8, resolution=8, seed=0, num_examples=16, worker_count=2
    )
    with pytest.raises(DataError, match=r"^dataset example 3: label 1099511627776 is not a class index"):
        list(loader)
    assert "Traceback" not in capfd.readouterr().err


_WORKER_RUN = """
import sys
sys.path.insert(0, {tests!r})
from test_data_pipeline import ArraySource
from convscale_cli.data import eval_loader, train_loader

def main():
    train = train_loader(ArraySource(64), global_batch_size=8, resolution=8, seed=0, num_examples=40, worker_count=2)
    batches = list(train)  # held to the end of the run, as a training run's last batch is
    evaluation = list(eval_loader(ArraySource(16), global_batch_size=8, resolution=8, worker_count=2))
    print(len(batches), len(evaluation))

if __name__ == "__main__":
    main()
"""


@pytest.mark.slow
def test_a_run_with_worker_processes_leaves_no_shared_memory_behind(tmp_path: Path) -> None:
    """Grain unlinks each batch's shared memory from a background thread; the unlinks pending at exit were left to
    Python's resource tracker, which warned of "leaked shared_memory objects" after every --workers run."""
    script = tmp_path / "run.py"
    script.write_text(_WORKER_RUN.format(tests=str(Path(__file__).resolve().parent)))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.split() == ["5", "2"], result.stderr
    assert "leaked shared_memory" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def _worker_pids() -> list[int]:
    """This process's spawned multiprocessing children (Grain's workers, not the resource tracker), from /proc."""
    import os

    pids = []
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == os.getpid() and b"spawn_main" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # not a process, or it ended while being read
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="lists child processes from /proc")
def test_worker_processes_leave_ctrl_c_to_the_main_process() -> None:
    """A terminal's Ctrl-C reaches every process of the group: the workers must not die of it (each printed a
    KeyboardInterrupt traceback, and the main process lost its batches before it could save and stop) — including
    a Ctrl-C while a worker's interpreter is still starting, before its start-up code could ignore it."""
    import os
    import signal
    import threading

    kwargs = dict(global_batch_size=8, resolution=8, seed=0, num_examples=40)
    stop, hit = threading.Event(), set()

    def ctrl_c_every_worker_from_the_start() -> None:
        while not stop.is_set():
            for pid in _worker_pids():
                try:
                    os.kill(pid, signal.SIGINT)
                    hit.add(pid)
                except ProcessLookupError:
                    pass
            stop.wait(0.002)

    interrupter = threading.Thread(target=ctrl_c_every_worker_from_the_start)
    interrupter.start()
    try:
        batches = list(train_loader(ArraySource(64), worker_count=2, **kwargs))
    finally:
        stop.set()
        interrupter.join()
    assert len(hit) >= 2, "the workers were never interrupted: the test tested nothing"
    expected = _ids(train_loader(ArraySource(64), **kwargs))
    np.testing.assert_array_equal(np.concatenate([b["id"][b["mask"] > 0] for b in batches]), expected)
