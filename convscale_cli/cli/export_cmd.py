"""``convscale export``: take a trained or imported model out of convscale (safetensors, or timm's layout)."""

from pathlib import Path
from typing import Annotated

import typer

from convscale_cli.cli import app
from convscale_cli.cli._output import err, print_json

_HELP = """Export a checkpoint's parameters: the reverse of import-weights.

PATH is a run directory (its newest checkpoint; a fine-tuning run's EMA parameters unless --no-ema), one checkpoint
RUN/checkpoints/STEP, or a weights checkpoint. --format safetensors writes OUT with a model.json beside it, which
load_model, eval and finetune --from read anywhere. --format timm writes a state dict in timm's layout for models with
a timm twin (NFNet F0-F6 -> dm_nfnet_fN, ViTs -> vit_*); load it with
timm.create_model(NAME, **KWARGS).load_state_dict(safetensors.torch.load_file(OUT)). A model whose numerics differ
from timm's is exported with a warning saying how."""


@app.command("export", help=_HELP)
def export(
    path: Annotated[Path, typer.Argument(help="Run directory, checkpoint directory or weights checkpoint.")],
    format_: Annotated[str, typer.Option("--format", help="safetensors or timm.")],
    out: Annotated[Path, typer.Option("--out", help="The .safetensors file to write (must not exist).")],
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Use a fine-tuning run's EMA parameters.")] = True,
    json_: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    from convscale_cli.export import export as run_export

    result = run_export(path, format_, out, ema=ema)
    if result["numerics_note"]:
        err(f"Warning: {result['numerics_note']}")
    if json_:
        print_json(result)
        return
    ckpt = result["checkpoint"]
    step = f" step {ckpt['step']}" if ckpt["step"] is not None else ""
    print(f"Exported {ckpt['model']}{step} ({ckpt['parameters']}) to {result['path']}")
    if result["format"] == "safetensors":
        print(f"  with {result['model_json']}; load it with convscale_cli.load_model({result['path']!r})")
    else:
        kwargs = "".join(f", {k}={v!r}" for k, v in result["kwargs"].items())
        print(
            f"  load it with {result['format']}.create_model({result['model']!r}{kwargs})"
            f".load_state_dict(safetensors.torch.load_file({result['path']!r}))"
        )
