"""``convscale import-weights``: convert a foreign checkpoint (timm safetensors) into a convscale weights checkpoint."""

from pathlib import Path
from typing import Annotated

import typer

from convscale_cli.cli import app
from convscale_cli.cli._output import print_json


@app.command("import-weights")
def import_weights(
    source: Annotated[str, typer.Argument(help="Library the weights come from: timm.")],
    model: Annotated[str, typer.Argument(help="Its model name, e.g. vit_base_patch16_224 or dm_nfnet_f0.")],
    file: Annotated[Path, typer.Argument(help="The state dict as a .safetensors file (pickles are never read).")],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint directory to create (must be absent or empty).")],
    num_classes: Annotated[
        int | None, typer.Option(help="Classifier size; another size than the file's starts a new zero head.")
    ] = None,
    numerics: Annotated[
        str,
        typer.Option(
            help="How the model computes: reference (the paper's code, e.g. DeepMind's tanh GELU) or timm (the "
            "source's own numerics: its logits exactly). Recorded in model.json and used by every command."
        ),
    ] = "reference",
    json_: Annotated[bool, typer.Option("--json", help="Print the checkpoint's model.json as JSON.")] = False,
) -> None:
    """Import pretrained weights into a checkpoint that `load_model`, `eval`, `export` and fine-tuning read."""
    from convscale_cli.weights import import_weights as run_import

    path, meta = run_import(source, model, file, out, num_classes, numerics=numerics)
    if json_:
        print_json({"path": str(path), **meta})
        return
    note = meta["source"].get("note")
    print(
        f"Imported {source} {model} as {meta['architecture']} ({meta['params'] / 1e6:.1f}M params, "
        f"{meta['num_classes']} classes, {meta['numerics']} numerics{', ' + note if note else ''}) into {path}"
    )
