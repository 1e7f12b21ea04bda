"""``convscale models``, ``datasets`` and ``plugins``: what the installed plugins provide."""

from typing import Annotated

import typer

from convscale_cli.cli import app
from convscale_cli.cli._output import print_json, print_table
from convscale_cli.errors import UsageError, did_you_mean

ModelPattern = Annotated[str | None, typer.Argument(help="Glob (nfnet-f*) or substring to filter model names.")]
DatasetPattern = Annotated[str | None, typer.Argument(help="Glob (shape*) or substring to filter dataset names.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _no_match(kind: str, pattern: str, names: list[str]) -> UsageError:
    """``no <kind> matches <pattern>``, with close matches for a mistyped name (not for a glob)."""
    hint = "" if any(c in pattern for c in "*?[") else did_you_mean(pattern.lower(), names)
    if hint:
        return UsageError(f"no {kind} matches {pattern!r}: {hint}")
    return UsageError(f"no {kind} matches {pattern!r}; run `convscale {kind}s` to list all")


@app.command()
def models(
    pattern: ModelPattern = None,
    family: Annotated[str | None, typer.Option(help="Only this family (nfnet, vit, ...).")] = None,
    resolution: Annotated[
        int | None, typer.Option(help="Count MACs at this resolution instead of each model's eval resolution.")
    ] = None,
    num_classes: Annotated[int | None, typer.Option(help="Classifier size for the counts (default: 1000).")] = None,
    json_: JsonOpt = False,
) -> None:
    """List registered architectures with parameters and forward GMACs per image."""
    from convscale_cli.plugins import ModelCountError, get_registry, warn_left_out

    if resolution is not None and resolution <= 0:
        raise UsageError(f"--resolution must be > 0, got {resolution}")
    if num_classes is not None and num_classes <= 0:
        raise UsageError(f"--num-classes must be > 0, got {num_classes}")
    registry = get_registry()
    specs = registry.architectures.match(pattern)
    if family:
        families = sorted({s.family for s in registry.architectures})
        if family not in families:
            from convscale_cli.errors import UnknownNameError

            raise UnknownNameError("family", family, families)
        specs = [s for s in specs if s.family == family]
    if pattern and not specs:
        raise _no_match("model", pattern, registry.architectures.names())
    rows = []
    for spec in specs:
        res = resolution or spec.eval_resolution
        classes = num_classes or spec.default_num_classes
        spec.check_resolution(res)
        try:
            count = spec.count(res, classes)
        except ModelCountError as exc:  # a broken plugin model must not hide the others
            warn_left_out(exc)
            continue
        rows.append(
            {
                "name": spec.name,
                "family": spec.family,
                "params": count.params,
                "macs": count.macs,
                "resolution": res,
                "num_classes": classes,
                "train_resolution": spec.train_resolution,
                "eval_resolution": spec.eval_resolution,
                "tags": list(spec.tags),
                "options": dict(spec.options),
                "plugin": registry.architectures.owner(spec.name),
                "description": spec.description,
            }
        )
    rows.sort(key=lambda r: (r["family"], r["params"], r["name"]))
    if json_:
        print_json(rows)
        return
    print_table(
        None,
        ["model", "family", "params", "GMACs", "@px", "train/eval px", "tags"],
        [
            (
                r["name"],
                r["family"],
                format_params(r["params"]),
                f"{r['macs'] / 1e9:.2f}" if r["macs"] >= 1e7 else f"{r['macs'] / 1e9:.4f}",
                r["resolution"],
                f"{r['train_resolution']}/{r['eval_resolution']}",
                ",".join(r["tags"]),
            )
            for r in rows
        ],
        right=["params", "GMACs", "@px"],
    )


def format_params(params: int) -> str:
    """A parameter count as ``models`` shows it: ``25.6M``, ``45.1k`` or ``512`` (a tiny model never shows ``0.0M``)."""
    if params >= 999_950:
        return f"{params / 1e6:.1f}M"
    return f"{params / 1e3:.1f}k" if params >= 1000 else str(params)


@app.command()
def datasets(pattern: DatasetPattern = None, json_: JsonOpt = False) -> None:
    """List registered datasets with their classes and split sizes."""
    from convscale_cli.plugins import get_registry

    registry = get_registry()
    specs = registry.datasets.match(pattern)
    if pattern and not specs:
        raise _no_match("dataset", pattern, registry.datasets.names())
    rows = []
    for spec in specs:
        info = spec.static_info
        rows.append(
            {
                "name": spec.name,
                "num_classes": info.num_classes if info else None,
                "split_sizes": dict(info.split_sizes) if info else None,
                "resolution": info.resolution if info else None,
                "multi_label": info.multi_label if info else None,
                "options": {k: v for k, v in spec.options.items()},
                "plugin": registry.datasets.owner(spec.name),
                "description": spec.description,
            }
        )
    if json_:
        print_json(rows)
        return
    print_table(
        None,
        ["dataset", "classes", "train", "eval", "px", "options", "description"],
        [
            (
                r["name"],
                r["num_classes"] if r["num_classes"] is not None else "from data",
                (r["split_sizes"] or {}).get("train", "from data"),
                (r["split_sizes"] or {}).get("eval", "from data"),
                r["resolution"] or "",
                ",".join(r["options"]),
                r["description"],
            )
            for r in rows
        ],
        right=["classes", "train", "eval", "px"],
    )


@app.command()
def plugins(json_: JsonOpt = False) -> None:
    """List loaded plugins: version, origin, hooks implemented and any load error."""
    import warnings

    from convscale_cli.errors import PluginError
    from convscale_cli.plugins import PluginWarning, load_plugins, strict_mode

    # The diagnostic command lists every failure in its table (no warnings repeating the rows), even under --strict,
    # which then exits 2 naming the first failure.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        loaded = load_plugins(strict=False)
    rows = [
        {
            "name": r.name,
            "version": r.version,
            "source": r.source,
            "hooks": r.hooks,
            "registered": r.registered,
            "error": r.error,
        }
        for r in loaded.records
    ]
    if json_:
        print_json(rows)
    else:
        print_table(
            None,
            ["plugin", "version", "source", "hooks", "error"],
            [(r["name"], r["version"], r["source"], ", ".join(r["hooks"]), r["error"] or "") for r in rows],
        )
    failed = [r for r in loaded.records if r.error]
    if failed and strict_mode():
        raise PluginError(f"plugin {failed[0].name!r} failed to load ({failed[0].error})")
