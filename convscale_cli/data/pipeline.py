"""Grain input pipelines with exactly-once sampling per epoch that survives pre-emption.

Why this design (Smith et al. 2023 §2): the paper's F7+ curve is not smooth because "our data loading pipeline did
not guarantee that each training example would be sampled once per epoch if the training run was pre-empted/
restarted". Here the whole example stream is a pure function of a position counter:

* global position ``p`` (0, 1, 2, ... over the whole run, counting augmented repeats) -> drawn example
  ``u = p // repeats`` -> epoch ``u // N`` and index ``shuffle_epoch(u % N)``, where ``shuffle_epoch`` is a
  bijection of ``[0, N)`` keyed by ``(seed, epoch)`` (a permutation table, or Grain's ``index_shuffle`` Feistel
  network for datasets too large for a table): a new global order every epoch;
* global batch ``k`` holds positions ``[k B, (k + 1) B)``; process ``i`` of ``P`` takes the contiguous slice
  ``[k B + i b, k B + (i + 1) b)`` with ``b = B / P`` (so each process reads only its own shard of every batch);
* positions ``>= num_examples`` are padding (mask 0, id -1) in the final batch only; so is an example whose
  source returned ``"image": None`` (a corrupt file the source skipped and reported);
* augmentation randomness is seeded by ``(seed, p)``.

The iterator state is therefore just the number of global batches consumed. Restarting from it replays nothing and
skips nothing, in any process layout: resuming with a different ``process_count`` (same global batch) is exact.
Grain provides the parallelism: ``MapDataset.range(steps).map(make_batch)`` read by threads
(:class:`grain.ReadOptions`) or worker processes (``mp_prefetch``), which decode and augment whole batches.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import math
import signal
from collections.abc import Iterator
from multiprocessing import resource_tracker
from typing import Any

import numpy as np

from convscale_cli.data.augment import (
    DEFAULT_EVAL_CROP_FRACTION,
    AugmentConfig,
    eval_transform,
    train_transform,
    uniforms,
)
from convscale_cli.errors import DataError, UsageError

STATE_VERSION = 1
# Up to this many examples the per-epoch order is an explicit permutation table (uint32, <= 256 MiB; 2M shapes
# examples: 8 MiB, 30 ms per epoch); beyond it, Grain's index_shuffle (~50 us per lookup, no memory).
PERMUTATION_TABLE_MAX = 1 << 26
_PREFETCH_BATCHES = 2  # per reading thread/worker; batches are large, so a short queue is enough to hide latency


def _epoch_key(seed: int, epoch: int) -> int:
    # 32-bit key for index_shuffle, different for every (seed, epoch) pair.
    return int(np.random.SeedSequence((seed, epoch)).generate_state(1)[0])


class _Examples:
    """Picklable batch builder shared by the training and evaluation loaders (runs inside Grain workers)."""

    def __init__(
        self,
        source: Any,
        *,
        train: bool,
        global_batch_size: int,
        local_batch_size: int,
        process_index: int,
        num_examples: int,
        resolution: int,
        seed: int,
        augment: AugmentConfig,
        crop_fraction: float,
    ) -> None:
        self.source = source
        self.train = train
        self.global_batch_size = global_batch_size
        self.local_batch_size = local_batch_size
        self.process_index = process_index
        self.num_examples = num_examples
        self.resolution = resolution
        self.seed = seed
        self.augment = augment
        self.crop_fraction = crop_fraction
        self.size = len(source)
        self._template: dict[str, Any] | None = None
        self._keys: dict[int, int] = {}
        self._tables: dict[int, np.ndarray] = {}

    def _key(self, epoch: int) -> int:
        if epoch not in self._keys:
            self._keys[epoch] = _epoch_key(self.seed, epoch)
        return self._keys[epoch]

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._tables:
            if len(self._tables) >= 2:  # an epoch boundary falls inside a batch at most: keep two epochs
                self._tables.pop(min(self._tables))
            key = np.random.SeedSequence((self.seed, epoch)).generate_state(1)[0]
            self._tables[epoch] = np.random.default_rng(key).permutation(self.size).astype(np.uint32)
        return self._tables[epoch]

    def index(self, position: int) -> int:
        """Dataset index of global stream ``position`` (train: shuffled per epoch; eval: identity)."""
        if not self.train:
            return position
        drawn = position // self.augment.repeats
        epoch, offset = divmod(drawn, self.size)
        if self.size <= PERMUTATION_TABLE_MAX:
            return int(self._permutation(epoch)[offset])
        from grain.experimental import index_shuffle

        # Datasets too large for a table (JFT-scale) use Grain's O(1)-memory Feistel bijection instead.
        return int(index_shuffle(offset, max_index=self.size - 1, seed=self._key(epoch), rounds=4))

    def _example(self, position: int, u: np.ndarray | None) -> dict[str, Any]:
        element = self.source[self.index(position)]
        if element["image"] is None:
            # The source could not decode this example (a corrupt file it has already reported): skip it by
            # giving it the padding's mask 0, so the batch keeps its static shape.
            return self._padding()
        if u is not None:
            image = train_transform(element["image"], self.resolution, u, self.augment)
        else:
            image = eval_transform(element["image"], self.resolution, self.crop_fraction)
        label = _label(element["label"], element["id"])
        return {"image": image, "label": label, "id": np.int64(element["id"]), "mask": np.float32(1.0)}

    def _padding(self) -> dict[str, Any]:
        if self._template is None:
            # Label shape (scalar or multi-hot) comes from a real example: a process's slice of the final batch may
            # hold no real example at all.
            label = self.source[0]["label"]
            self._template = {
                "image": np.zeros((self.resolution, self.resolution, 3), np.uint8),
                "label": np.zeros(np.shape(label), np.float32 if np.ndim(label) else np.int32),
                "id": np.int64(-1),
                "mask": np.float32(0.0),
            }
        return self._template

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        start = step * self.global_batch_size + self.process_index * self.local_batch_size
        positions = np.arange(start, start + self.local_batch_size)
        draws = uniforms(self.seed, positions) if self.train else [None] * len(positions)
        examples = [
            self._example(int(p), u) if p < self.num_examples else self._padding()
            for p, u in zip(positions, draws, strict=True)
        ]
        return {key: np.stack([e[key] for e in examples]) for key in ("image", "label", "id", "mask")}


def _label(label: Any, example_id: Any) -> np.ndarray:
    """A source's label as the batch holds it: int32 class index, or float32 multi-hot vector.

    Checked here, where each example is read (in a worker process with ``--workers``): a label numpy cannot hold
    (2**40, text) would otherwise end the run with the worker's traceback, and a float class index would be truncated
    silently. The range against the classifier is checked on the host (:func:`convscale_cli.engine.build.host_batch`).

    Raises:
        DataError: a label that is neither an integer in [0, 2**31) nor a vector of numbers.
    """
    try:
        if np.ndim(label):
            return np.asarray(label, np.float32)
    except (TypeError, ValueError):  # a ragged list, text in the vector
        raise DataError(
            f"dataset example {example_id}: multi-hot label {label!r:.60} is not a vector of numbers"
        ) from None
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)) or not 0 <= label < 2**31:
        raise DataError(
            f"dataset example {example_id}: label {label!r:.60} is not a class index (an integer in [0, num_classes))"
        )
    return np.int32(label)


def _settle_shared_memory(*, at_exit: bool = False) -> None:
    """Finish Grain's pending unlinks of the worker batches' shared memory.

    Batches from worker processes live in shared memory that Grain unlinks from a background thread when each array
    is freed (``SharedMemoryArray.enable_async_del``). Unlinks still queued when the interpreter exits never run,
    and Python's resource tracker then removes the segments itself with a "leaked shared_memory objects" warning at
    the end of every ``--workers`` run (google/grain#398). This waits for the queue (one thread, first in first
    out, so a no-op task returns after every earlier unlink); ``at_exit`` also switches later frees to synchronous
    unlinks and collects the batches nothing refers to any more. What Grain keeps alive past this point is its own.
    """
    try:
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
    except ImportError:  # another Grain layout: its own cleanup is all there is
        return
    thread_pool = getattr(SharedMemoryArray, "_del_thread_pool", None)
    if thread_pool is None:
        return
    try:
        thread_pool.apply(int)
    except ValueError:  # the pool is already closed
        return
    if at_exit:
        SharedMemoryArray._del_thread_pool = None
        import gc

        gc.collect()


def _ignore_interrupts(worker_index: int, worker_count: int) -> None:
    """Grain worker start-up: leave Ctrl-C to the main process.

    A terminal's Ctrl-C reaches the whole process group. The main process saves a checkpoint and stops its workers
    itself (exit 130); workers that took the SIGINT too each died printing a ``KeyboardInterrupt`` traceback. A
    worker starts with SIGINT held (:func:`_ctrl_c_held`); ignoring it discards one that arrived during start-up,
    after which it can be let through.
    """
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextlib.contextmanager
def _ctrl_c_held(workers: bool) -> Iterator[None]:
    """Hold SIGINT in this thread while worker processes start, as CPython's resource tracker does when it spawns.

    A spawned worker's interpreter takes a Ctrl-C as ``KeyboardInterrupt`` until :func:`_ignore_interrupts` runs, and
    a Ctrl-C in that start-up window killed it. Processes (and the threads that spawn them) inherit the signal mask of
    the thread that starts them, so a worker starts with SIGINT held. This process gets its own Ctrl-C when the mask is
    restored: delivered late, never lost.
    """
    if not workers:
        yield
        return
    # Spawning starts the resource tracker if it is not running, which unblocks SIGINT in the spawning thread (it
    # does not restore the mask), so the next worker would start with Ctrl-C let through: start it first.
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@functools.cache
def _settle_at_exit() -> None:
    """Register :func:`_settle_shared_memory` to run at exit (once per process)."""
    atexit.register(functools.partial(_settle_shared_memory, at_exit=True))


class Loader:
    """An iterable over per-process batches with exact, JSON-serialisable resume state.

    Iterating yields the remaining batches from the current step to :attr:`steps`. :meth:`get_state` after a
    batch was consumed, saved with the checkpoint, and :meth:`set_state` before iterating again resume exactly.
    """

    def __init__(self, examples: _Examples, *, kind: str, steps: int, worker_count: int, process_count: int) -> None:
        self._examples = examples
        self.kind = kind
        self.steps = steps
        self.worker_count = worker_count
        self.process_count = process_count
        self.local_batch_size = examples.local_batch_size
        self.global_batch_size = examples.global_batch_size
        self.num_examples = examples.num_examples
        self._step = 0
        self._live: Any = None

    @property
    def step(self) -> int:
        """Number of batches consumed so far (the next batch to be produced)."""
        return self._step

    @property
    def epochs(self) -> float:
        """Passes over the dataset this loader makes (distinct draws, not counting augmentation repeats)."""
        return self.num_examples / self._examples.augment.repeats / self._examples.size

    def __len__(self) -> int:
        return self.steps

    def _dataset(self, start: int, *, repeat: bool = False) -> Any:
        import grain

        ds = grain.MapDataset.range(start, self.steps)
        if repeat:
            ds = ds.repeat(None)  # batch ``i`` of every pass is built from index ``i`` alone: the same batches
        ds = ds.map(self._examples)
        if self.worker_count > 0:
            from absl import flags

            # Grain's worker processes read absl flags, which only an absl `app.run` program has parsed; the
            # defaults are what we want (grain issue: "Trying to access flag ... before flags were parsed").
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            _settle_at_exit()
            # Worker processes (spawned) decode and augment whole batches; one reading thread each keeps the order.
            ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=_PREFETCH_BATCHES))
            return ids.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=self.worker_count, per_worker_buffer_size=_PREFETCH_BATCHES),
                worker_init_fn=_ignore_interrupts,
            )
        # In-process: two threads overlap PIL decoding (which releases the GIL) with the training step.
        return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=_PREFETCH_BATCHES))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.close()
        if self._step >= self.steps:
            return
        try:
            # The worker processes (if any) start with the iterator's first batch.
            with _ctrl_c_held(self.worker_count > 0):
                iterator = self._live = iter(self._dataset(self._step))
                batch = next(iterator, None)
            while batch is not None:
                # Count before yielding: a state saved right after receiving batch k resumes at batch k + 1.
                self._step += 1
                yield batch
                batch = next(iterator, None)
        finally:
            self.close()

    def passes(self) -> Iterator[dict[str, np.ndarray]]:
        """Endless passes over the loader's batches from one live iteration: with ``worker_count`` > 0 its worker
        processes start once and serve every pass (a held-out set read at each evaluation of a run).

        Each pass yields :attr:`steps` batches, identical in every pass (the batches depend on their index only); the
        resume position (:attr:`step`) is not advanced. Stop it with :meth:`close`.
        """
        self.close()
        if self.steps == 0:
            return
        try:
            with _ctrl_c_held(self.worker_count > 0):
                iterator = self._live = iter(self._dataset(0, repeat=True))
                batch = next(iterator)
            yield batch
            yield from iterator
        finally:
            self.close()

    def close(self) -> None:
        """Stop any worker processes of a live iteration."""
        live, self._live = self._live, None
        if live is not None and hasattr(live, "close"):
            live.close()
        if self.worker_count > 0:
            _settle_shared_memory()

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable resume state (global: independent of ``process_index`` and ``process_count``)."""
        ex = self._examples
        return {
            "version": STATE_VERSION,
            "kind": self.kind,
            "step": self._step,
            "examples_consumed": min(self._step * self.global_batch_size, self.num_examples),
            "global_batch_size": self.global_batch_size,
            "num_examples": self.num_examples,
            "dataset_size": ex.size,
            "seed": ex.seed,
            "repeats": ex.augment.repeats,
            "process_count": self.process_count,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`get_state` output (of any process, with any process count)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            version = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise DataError(f"unsupported data-loader state version {version!r}: expected {STATE_VERSION}")
        mine = self.get_state()
        # A changed process_count is fine (positions are global); anything that changes the example stream is not.
        for key in ("kind", "global_batch_size", "num_examples", "dataset_size", "seed", "repeats"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"cannot resume the data loader with {key}={mine[key]!r}: the saved state has {key}="
                    f"{state.get(key)!r} and resuming would change which examples are seen"
                )
        step = state.get("step")
        if not isinstance(step, int) or not 0 <= step <= self.steps:
            raise DataError(f"data-loader state step {step!r} is outside [0, {self.steps}]")
        self.close()
        self._step = step


def _check_layout(global_batch_size: int, process_index: int, process_count: int, worker_count: int) -> int:
    if global_batch_size <= 0:
        raise UsageError(f"global batch size must be > 0, got {global_batch_size}")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise UsageError(f"process_index {process_index} is not in [0, {process_count}) processes")
    if global_batch_size % process_count:
        raise UsageError(f"global batch size {global_batch_size} is not divisible by {process_count} processes")
    if worker_count < 0:
        raise UsageError(f"worker_count must be >= 0, got {worker_count}")
    return global_batch_size // process_count


def _check_source(source: Any) -> int:
    try:
        size = len(source)
    except TypeError as exc:
        raise DataError(f"data source {source!r} has no length: a random-access source is required") from exc
    if size <= 0:
        raise DataError(f"data source {source!r} is empty")
    if size >= 2**32:
        raise DataError(f"data source has {size} examples: the index shuffle supports fewer than 2**32")
    return size


def train_loader(
    source: Any,
    *,
    global_batch_size: int,
    resolution: int,
    seed: int,
    num_examples: int,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    augment: AugmentConfig | None = None,
) -> Loader:
    """Training batches for exactly ``num_examples`` examples, reshuffled every epoch.

    Args:
        source: random-access dataset split (``len``, ``source[i]`` -> ``{"image", "label", "id"}``).
        global_batch_size: examples per step over all processes.
        resolution: output image side in pixels.
        seed: sampling and augmentation seed (the same seed gives the same stream).
        num_examples: examples to produce (counting augmentation repeats); fractional epochs are exact.
        process_index: this process's index among ``process_count`` data-loading processes (hosts).
        process_count: number of processes; each reads only its ``global_batch_size / process_count`` slice.
        worker_count: Grain worker processes for decoding and augmentation (0: threads in this process).
        augment: training augmentation; default inception crop + flip.

    Returns:
        A :class:`Loader` with ``steps = ceil(num_examples / global_batch_size)`` batches of
        ``{"image": uint8[b, H, W, 3], "label": int32[b] | float32[b, C], "id": int64[b], "mask": float32[b]}``.
    """
    local = _check_layout(global_batch_size, process_index, process_count, worker_count)
    _check_source(source)
    if num_examples <= 0:
        raise UsageError(f"num_examples must be > 0, got {num_examples}")
    if resolution <= 0:
        raise UsageError(f"resolution must be > 0, got {resolution}")
    examples = _Examples(
        source,
        train=True,
        global_batch_size=global_batch_size,
        local_batch_size=local,
        process_index=process_index,
        num_examples=int(num_examples),
        resolution=resolution,
        seed=int(seed),
        augment=augment or AugmentConfig(),
        crop_fraction=DEFAULT_EVAL_CROP_FRACTION,
    )
    steps = math.ceil(num_examples / global_batch_size)
    return Loader(examples, kind="train", steps=steps, worker_count=worker_count, process_count=process_count)


def eval_loader(
    source: Any,
    *,
    global_batch_size: int,
    resolution: int,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    crop_fraction: float = DEFAULT_EVAL_CROP_FRACTION,
) -> Loader:
    """One padded pass over ``source`` in order, resized and centre-cropped to ``resolution``.

    Args:
        source: random-access dataset split.
        global_batch_size: examples per step over all processes.
        resolution: output image side in pixels (the evaluation resolution).
        process_index: this process's index; process_count: number of processes.
        worker_count: Grain worker processes (0: threads in this process).
        crop_fraction: the centre crop covers this fraction of the shorter side (0.875 = the paper's 224/256).

    Returns:
        A :class:`Loader` of ``ceil(len(source) / global_batch_size)`` batches in the training batch format.
    """
    local = _check_layout(global_batch_size, process_index, process_count, worker_count)
    size = _check_source(source)
    if not 0.0 < crop_fraction <= 1.0:
        raise UsageError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    examples = _Examples(
        source,
        train=False,
        global_batch_size=global_batch_size,
        local_batch_size=local,
        process_index=process_index,
        num_examples=size,
        resolution=resolution,
        seed=0,
        augment=AugmentConfig(),
        crop_fraction=crop_fraction,
    )
    steps = math.ceil(size / global_batch_size)
    return Loader(examples, kind="eval", steps=steps, worker_count=worker_count, process_count=process_count)
