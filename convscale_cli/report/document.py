"""The report's sections as document blocks, built only from the ``fit.json`` dictionary."""

from __future__ import annotations

from typing import Any

from convscale_cli.report.render import Block, Bullets, Heading, Image, Paragraph, Table


def _g(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return f"{value:.{digits}g}"
    return str(value)


def _interval(pair: Any, digits: int = 3) -> str:
    return f"[{_g(pair[0], digits)}, {_g(pair[1], digits)}]" if pair else "–"


def _count(n: int, noun: str, plural: str = "") -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _params(value: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _summary(result: dict[str, Any]) -> list[Block]:
    runs = result["runs"]
    pretrain = sum(r["kind"] == "pretrain" for r in runs)
    text = (
        f"Dataset **{result['dataset']}**: {pretrain} pre-training and {len(runs) - pretrain} fine-tuning runs used, "
        f"{_count(len(result['skipped']), 'run directory', 'run directories')} skipped"
    )
    if result["excluded_other_datasets"]:
        text += f", {_count(result['excluded_other_datasets'], 'run')} on other datasets left out"
    text += (
        ". The learning rate is chosen per (model, epoch budget) cell, leaving "
        f"{_count(len(result['cells']), 'cell')}, "
        f"{len(result['frontier'])} of them on the compute frontier. Compute is in {result['compute_unit']} "
        "(the paper's axis, §1.6)."
    )
    items = tuple(
        f"**({'abcd'[i]}) {v['claim']}**: **{v['status']}**"
        + (f" ({v['reason']})" if v["status"] == "inconclusive" else f": {v['reason']}")
        for i, v in enumerate(result["verdicts"])
    )
    return [Heading("Verdicts on the paper's findings"), Paragraph(text), Bullets(items)]


def _loss_section(result: dict[str, Any], images: dict[str, str]) -> list[Block]:
    blocks: list[Block] = [Heading("Held-out loss vs compute"), Image(images["loss_vs_compute"], "loss vs compute")]
    fit = result["power_law"]
    if fit:
        blocks.append(
            Paragraph(
                f"Frontier fit: L = {_g(fit['a'], 4)} · C^(-{_g(fit['b'], 4)}), R² = {_g(fit['r2'], 4)} over "
                f"{fit['n']} points; {100 * fit['level']:.0f}% bootstrap CI of b {_interval(fit['b_interval'])}, "
                f"of a {_interval(fit['a_interval'])} ({fit['bootstrap']} resamples; shaded band)."
            )
        )
    else:
        blocks.append(Paragraph(f"No power law fitted: {result.get('power_law_error', 'no frontier')}."))
    return blocks


def _parametric_section(result: dict[str, Any]) -> list[Block]:
    blocks: list[Block] = [Heading("Parametric law L(N, D) = E + A/N^α + B/D^β")]
    fit = result["parametric"]
    if not fit:
        return blocks + [Paragraph(f"Not fitted: {result.get('parametric_error', 'too few cells')}.")]
    rows = tuple(
        (name, _g(fit[name], 4), _interval(fit["intervals"].get(name), 3)) for name in ("E", "A", "alpha", "B", "beta")
    )
    blocks.append(
        Paragraph(
            f"N = {fit['size_axis']}, D = examples seen; Huber loss on log residuals (Hoffmann et al. 2022), "
            f"multi-start L-BFGS, {fit['bootstrap']} bootstrap resamples over {fit['n']} cells "
            f"({fit['n_sizes']} model sizes). Compute-optimal allocation: "
            f"N_opt ∝ C^{_g(fit['optimal_size_exponent'])}, D_opt ∝ C^{_g(fit['optimal_data_exponent'])}."
        )
    )
    blocks.append(Table(("parameter", "estimate", f"{100 * fit['level']:.0f}% CI"), rows))
    if fit["warnings"]:
        blocks.append(Paragraph("**Warning: the exponents may not be identifiable from these runs:**"))
        blocks.append(Bullets(tuple(fit["warnings"])))
    return blocks


def _optimal_section(result: dict[str, Any], images: dict[str, str]) -> list[Block]:
    blocks: list[Block] = [Heading("Compute-optimal model and epoch budget")]
    if "compute_optimal" in images:
        blocks.append(Image(images["compute_optimal"], "compute-optimal model size and epochs"))
    observed = result["compute_optimal"]["observed"]
    blocks.append(
        Table(
            ("core-hours", "model", "params", "epochs", "loss"),
            tuple(
                (_g(r["core_hours"]), r["model"], _params(r["params"]), _g(r["epochs"]), _g(r["loss"], 4))
                for r in observed
            ),
            caption="Observed: the frontier (the best run at each compute).",
        )
    )
    crossing = result["compute_optimal"]["epochs_above_one_from"]
    blocks.append(
        Paragraph(
            f"The frontier first trains for more than one epoch at {_g(crossing)} core-hours "
            "(Smith et al. 2023: above roughly 5k TPU-v4 core-hours on JFT-4B)."
            if crossing is not None
            else "No frontier run trains for more than one epoch."
        )
    )
    predicted = result["compute_optimal"]["predicted"]
    if predicted and "continuous_macs" in predicted[0]:
        blocks.append(
            Table(
                ("core-hours", "optimal GMACs/image", "optimal epochs"),
                tuple(
                    (_g(r["core_hours"]), _g(r["continuous_macs"] / 1e9), _g(r["continuous_epochs"])) for r in predicted
                ),
                caption="Continuous optimum of the parametric law (N = MACs, C = 6 * MACs * D): "
                "the ideal model size, whether or not such a model exists.",
            )
        )
    if predicted:
        blocks.append(
            Table(
                ("core-hours", "model", "epochs", "predicted loss", "note"),
                tuple(
                    (
                        _g(r["core_hours"]),
                        r["model"],
                        _g(r["epochs"]),
                        _g(r["predicted_loss"], 4),
                        "largest model tried: a larger one may be better" if r["at_largest_model"] else "",
                    )
                    for r in predicted
                ),
                caption="Predicted by the parametric law among the trained models, up to 100x the largest compute.",
            )
        )
    return blocks


def _lr_section(result: dict[str, Any], images: dict[str, str]) -> list[Block]:
    table = result["lr_by_epochs"]
    blocks: list[Block] = [Heading("Optimal learning rate vs epoch budget")]
    if not table:
        return blocks + [Paragraph("No cell tried more than one learning rate.")]
    blocks.append(Image(images["lr_vs_epochs"], "optimal learning rate vs epochs"))
    rows = tuple(
        (model, _g(r["epochs"]), _g(r["lr"]), ", ".join(_g(x) for x in r["lrs"]), "yes" if r["at_edge"] else "")
        for model, entries in sorted(table.items())
        for r in entries
    )
    blocks.append(Table(("model", "epochs", "best lr", "lrs tried", "at grid edge"), rows))
    return blocks


def _tuning_section(result: dict[str, Any]) -> list[Block]:
    tuning = result["tuning"]
    if not tuning["decisions"] and not tuning["unreadable_lines"]:
        return []
    rows = tuple(
        (
            d["model"],
            _g(d["epochs"]),
            str(d.get("rule", "")),
            f"{_g(d.get('start_lr'))} ({d.get('source', '')})",
            ", ".join(_g(t.get("lr")) for t in d["trials"] if isinstance(t, dict)),
            _g(d["best_lr"]),
            f"try {_g(d['next_lr'])} next" if d.get("next_lr") is not None else "",
        )
        for d in sorted(tuning["decisions"], key=lambda d: (d["model"], d["epochs"]))
    )
    blocks: list[Block] = [
        Heading("Learning-rate tuning decisions", 3),
        Table(("model", "epochs", "rule", "start lr (from)", "lrs tried", "best lr", "note"), rows),
    ]
    if tuning["unreadable_lines"]:
        blocks.append(Paragraph(f"{_count(tuning['unreadable_lines'], 'line')} of tuning.jsonl could not be read."))
    return blocks


def _backtest_section(result: dict[str, Any], images: dict[str, str]) -> list[Block]:
    test = result["backtest"]
    blocks: list[Block] = [Heading("Back-test: predicting the largest runs")]
    if not test:
        return blocks + [Paragraph("Too few cells for a back-test (need >= 3).")]
    if "backtest" in images:
        blocks.append(Image(images["backtest"], "back-test"))
    blocks.append(
        Paragraph(
            f"Both laws were refitted on the {test['trained_on']} cheapest cells; the {test['held_out']} cells at or "
            f"above {_g(test.get('threshold_core_hours'))} core-hours were predicted. Mean absolute relative error: "
            f"power law {_g(test.get('power_law_error'))} (frontier cells only), "
            f"parametric {_g(test.get('parametric_error'))}."
        )
    )
    if test["skipped"]:
        blocks.append(Bullets(tuple(test["skipped"])))
    rows = tuple(
        (
            r["model"],
            _g(r["epochs"]),
            _g(r["core_hours"]),
            _g(r["observed"], 4),
            _g(r["power_law"], 4) if r["on_frontier"] else "(not on frontier)",
            _g(r["parametric"], 4),
        )
        for r in test["rows"]
    )
    blocks.append(Table(("model", "epochs", "core-hours", "observed", "power law", "parametric"), rows))
    return blocks


def _finetune_section(result: dict[str, Any], images: dict[str, str]) -> list[Block]:
    points = result["finetune"]["points"]
    blocks: list[Block] = [Heading("Fine-tuned top-1 vs pre-training compute")]
    if points:
        blocks.append(Image(images["finetune"], "fine-tuned top-1 vs pre-training compute"))
        blocks.append(
            Table(
                ("model", "fine-tune dataset", "pre-training core-hours", "top-1 (%)", "run"),
                tuple(
                    (p["model"], p["dataset"], "none (scratch)" if p.get("scratch") else _g(p["pretrain_core_hours"]),
                     f"{p['top1']:.2f}", p["run"])
                    for p in points
                ),
            )
        )
    else:
        blocks.append(Paragraph("No fine-tuning runs."))
    blocks.append(
        Table(
            ("model", "pre-training TPU-v4 core-hours", "ImageNet top-1 (%)", "source"),
            tuple(
                (r["model"], f"{r['core_hours'] / 1e3:g}k", f"{r['top1']:g}", r["source"])
                for r in result["finetune"]["references"]
            ),
            caption="Published reference points (JFT pre-training, ImageNet fine-tuning); not from these runs.",
        )
    )
    return blocks


def _family_section(result: dict[str, Any], images: dict[str, str]) -> list[Block]:
    comparison = result["families"]
    if not comparison:
        return []
    names = sorted(comparison["families"])
    blocks: list[Block] = [Heading("Families at equal compute"), Image(images["families"], "families")]
    fits = [
        f"{name}: b = {_g(entry['fit']['b'], 4)}, R² = {_g(entry['fit']['r2'], 3)}"
        for name, entry in sorted(comparison["families"].items())
        if entry.get("fit")
    ]
    if fits:
        blocks.append(Bullets(tuple(fits)))
    if not comparison["matched"]:
        return blocks + [Paragraph("The families' frontiers do not overlap in compute: no matched comparison.")]
    rows = tuple((_g(row["core_hours"]), *(_g(row[name], 4) for name in names)) for row in comparison["matched"])
    blocks.append(
        Table(
            ("core-hours", *(f"{name} best loss" for name in names)),
            rows,
            caption="Lowest held-out loss each family reached with at most this compute.",
        )
    )
    return blocks


def _runs_section(result: dict[str, Any]) -> list[Block]:
    rows = tuple(
        (
            r["name"],
            r["kind"],
            r["model"],
            _g(r["epochs"]),
            _g(r["lr"]),
            str(r["seed"]),
            _g(r["core_hours"]),
            _g(r["eval_loss"], 4),
            "–" if r["eval_top1"] is None else f"{100 * r['eval_top1']:.2f}",
        )
        for r in result["runs"]
    )
    blocks: list[Block] = [
        Heading("Runs"),
        Table(("run", "kind", "model", "epochs", "lr", "seed", "core-hours", "eval loss", "top-1 (%)"), rows),
    ]
    if result["skipped"]:
        blocks.append(Heading("Skipped run directories", 3))
        blocks.append(Table(("run", "reason"), tuple((s["path"], s["reason"]) for s in result["skipped"])))
    return blocks


def build_document(result: dict[str, Any], images: dict[str, str]) -> list[Block]:
    """All report sections, in reading order."""
    return [
        *_summary(result),
        *_loss_section(result, images),
        *_parametric_section(result),
        *_optimal_section(result, images),
        *_lr_section(result, images),
        *_tuning_section(result),
        *_backtest_section(result, images),
        *_family_section(result, images),
        *_finetune_section(result, images),
        *_runs_section(result),
    ]
