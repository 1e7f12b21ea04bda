"""Handled failures stay quiet: a checkpoint that cannot be restored is one warning, with no "Event loop is closed"
tracebacks or "Task exception was never retrieved" logs from the reads the failed restore left in flight.

Orbax restores through TensorStore, whose completed reads call back into the asyncio loop that awaited them. When one
read fails, Orbax's loop ends and closes while other reads are still running; each of them then reported
``RuntimeError: Event loop is closed`` through ``sys.unraisablehook``, dozens of tracebacks after the warning, at
random points of the resumed run.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import _engine_helpers as helpers
import pytest

from convscale_cli.engine import checkpoint

TESTS = Path(__file__).resolve().parent


def _closed_loop_callback() -> BaseException:
    """The exception a late TensorStore callback meets: ``call_soon_threadsafe`` on a closed loop."""
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(lambda: None)
    except RuntimeError as exc:
        assert exc.__traceback__ is not None
        return exc.with_traceback(exc.__traceback__.tb_next)  # from native code: no Python caller's frame
    raise AssertionError("a closed loop accepted a callback")


def _unraisable(exc: BaseException) -> None:
    """Report ``exc`` as native code does (pybind11, with no object)."""
    sys.unraisablehook(
        types.SimpleNamespace(
            exc_type=type(exc), exc_value=exc, exc_traceback=exc.__traceback__, err_msg=None, object=None
        )
    )


def _never_retrieved(filename: str) -> None:
    """A task of a coroutine defined in ``filename`` fails and is collected unretrieved (asyncio logs it)."""
    namespace: dict[str, object] = {}
    exec(compile("async def read():\n    raise ValueError('NOT_FOUND')\n", filename, "exec"), namespace)
    loop = asyncio.new_event_loop()
    task = loop.create_task(namespace["read"]())  # type: ignore[operator]
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    del task
    gc.collect()


@pytest.fixture
def quiet() -> Iterator[list[BaseException]]:
    """The filters installed over a recording unraisable hook; yields what reached the recorder."""
    previous, filters = sys.unraisablehook, list(logging.getLogger("asyncio").filters)
    reported: list[BaseException] = []
    sys.unraisablehook = lambda args: reported.append(args.exc_value)
    logging.getLogger("asyncio").filters[:] = []  # an earlier test's run may have installed them already
    checkpoint.quiet_async_leftovers()
    checkpoint.quiet_async_leftovers()  # idempotent: one filter, not a chain of them
    yield reported
    sys.unraisablehook = previous
    logging.getLogger("asyncio").filters[:] = filters


def test_late_callbacks_into_a_closed_loop_are_not_reported(quiet: list[BaseException]) -> None:
    _unraisable(_closed_loop_callback())
    assert quiet == []
    try:
        raise RuntimeError("Event loop is closed")  # the same words from Python code: still reported
    except RuntimeError as exc:
        _unraisable(exc)
    try:
        raise ValueError("a real problem")
    except ValueError as exc:
        _unraisable(exc)
    assert [str(e) for e in quiet] == ["Event loop is closed", "a real problem"]


def test_orbax_tasks_never_retrieved_are_not_logged(
    quiet: list[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    assert len(logging.getLogger("asyncio").filters) == 1
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        _never_retrieved(os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "serialization.py"))
        assert not caplog.records
        _never_retrieved(os.path.join(os.sep, "site-packages", "mylib", "io.py"))  # anyone else's: still logged
        assert [r.getMessage().splitlines()[0] for r in caplog.records] == ["Task exception was never retrieved"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "finished"
    helpers.main([str(out), "steps=8"])
    (out / "summary.json").unlink()
    return out


@pytest.mark.slow
def test_a_fallback_past_an_unrestorable_step_is_one_warning(finished: Path, tmp_path: Path) -> None:
    # Step 8 lost its OCDBT manifest and has no checksums (a step saved before them): Orbax itself fails to read it.
    # The noise was a race (about half of the runs), so the fallback is repeated.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    for attempt in range(3):
        out = tmp_path / f"run{attempt}"
        shutil.copytree(finished, out)
        (out / "checkpoints" / "8" / checkpoint.CHECKSUMS).unlink()
        (out / "checkpoints" / "8" / "state" / "manifest.ocdbt").unlink()
        proc = subprocess.run(
            [sys.executable, str(TESTS / "_engine_helpers.py"), str(out), "steps=8"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0 and '"steps": 8' in proc.stdout, proc.stderr[-3000:]
        assert "checkpoint of step 8" in proc.stderr and "trying the previous one" in proc.stderr
        assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]


def _truncate_array_data(step_dir: Path) -> None:
    for data in (step_dir / "state").rglob("*"):
        if data.is_file() and (data.parent.name == "d"):  # OCDBT data files: arrays and zarr metadata
            data.write_bytes(data.read_bytes()[:100])


def test_no_readable_checkpoint_is_one_clean_error(
    finished: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from convscale_cli.engine.api import pretrain
    from convscale_cli.errors import CheckpointError

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    for step in ("4", "8"):
        (out / "checkpoints" / step / checkpoint.CHECKSUMS).unlink()
        _truncate_array_data(out / "checkpoints" / step)
    capfd.readouterr()
    with pytest.warns(checkpoint.CheckpointWarning), pytest.raises(CheckpointError) as info:
        pretrain(helpers.config(out, steps=8), helpers.registry())
    gc.collect()
    message = str(info.value)
    assert message.startswith(f"no readable checkpoint in {out / 'checkpoints'}: step 8: "), message
    assert "pybind11" not in message and "bound method" not in message, message
    err = capfd.readouterr().err
    assert "Exception ignored" not in err and "Traceback" not in err, err[-3000:]


def test_a_tensorstore_failure_is_described_without_its_method_repr() -> None:
    # Orbax's wording when an array's bytes cannot be read; the repr named a pybind11 function record.
    exc = Exception(
        "Encountered error while reading array index: (slice(0, 8, 1),). See full TensorStore details: <bound method "
        "pybind11_detail_function_record_v1_system_libstdcpp_gxx_abi_1xxx_use_cxx11_abi_1.spec of TensorStore({\n})>."
    )
    assert checkpoint.describe_failure(exc) == "Encountered error while reading array index: (slice(0, 8, 1),)."


def test_abandoned_orbax_read_coroutines_are_not_reported(quiet: list[BaseException]) -> None:
    namespace: dict[str, object] = {}
    for filename in (os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "x.py"), "/elsewhere/y.py"):
        exec(compile("async def read():\n    pass\n", filename, "exec"), namespace)
        coroutine = namespace["read"]()  # type: ignore[operator]
        try:
            raise Exception("Encountered error while reading array index")
        except Exception as exc:
            sys.unraisablehook(
                types.SimpleNamespace(
                    exc_type=type(exc),
                    exc_value=exc,
                    exc_traceback=exc.__traceback__,
                    err_msg="Exception ignored in",
                    object=coroutine,
                )
            )
        coroutine.close()  # type: ignore[attr-defined]
    assert len(quiet) == 1  # only the coroutine from elsewhere
