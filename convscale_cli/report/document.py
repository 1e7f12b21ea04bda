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
        f"Data **{result['data']}**: {pretrain} pre-training and {len(runs) - pretrain} fine-tuning runs used, "
        f"{_count(len(result['skipped']), 'run directory', 'run directories')} skipped"
    )
    if result["other_data"]:
        text += f", {_count(len(result['other_data']), 'run')} trained on other data left out (listed below)"
    design = result["design"]
    text += (
        f". Findings (a)-(c) are judged on the {result['family']} runs. The learning rate is chosen per (model, epoch "
        f"budget) cell (seeds averaged), leaving {_count(design['cells'], 'cell')}, {design['frontier_points']} of "
        f"them on the compute-optimal envelope. Compute is in {result['compute_note']}."
    )
    text += _regime_text(result.get("regime"))
    noise, boot = result["noise"], result["bootstrap"]
    if noise["sigma"] is not None and noise["df"]:
        source = {
            "seeds": "the spread between seeds",
            "lr response": "each cell's lr response (a parabola in log lr)",
            "fit": "the parametric law's residuals",
        }.get(noise["source"], noise["source"])
        text += (
            f" Run noise: {_g(noise['sigma'])} in log loss, measured from {source} ({noise['df']} degrees of "
            f"freedom). Every interval is a {100 * boot['level']:.0f}% bootstrap over runs through the whole "
            f"analysis ({boot['replicates']} replicates), checked for coverage on simulated studies "
            "(docs/calibration.md)."
        )
    else:
        text += " Run noise could not be measured, so no interval is given and verdicts that need one are inconclusive."
    items = tuple(
        f"**({'abcd'[i]}) {v['claim']}**: **{v['status']}**"
        + (f" ({v['reason']})" if v["status"] == "inconclusive" else f": {v['reason']}")
        for i, v in enumerate(result["verdicts"])
    )
    return [Heading("Verdicts on the paper's findings"), Paragraph(text), Bullets(items)]


def regime_line(regime: dict[str, Any]) -> str:
    """The regime in one line, as ``convscale report`` and the quickstart print it."""
    return (
        f"the best cell's held-out loss {regime['best_loss']:.3f} is {100 * regime['fraction_of_chance']:.0f}% of "
        f"chance (ln {regime['classes']} = {regime['chance_loss']:.2f})"
        + (": the early transient, where only the log-log law can show" if regime["early_transient"] else "")
    )


def _regime_text(regime: dict[str, Any] | None) -> str:
    if not regime:
        return ""
    best, epochs = regime["best_cell"], regime["best_cell"]["epochs"]
    text = (
        f" The best cell ({best['model']}, {_g(epochs)} epoch{'' if epochs == 1 else 's'}) reaches a held-out loss of "
        f"{regime['best_loss']:.3f}, {100 * regime['fraction_of_chance']:.0f}% of chance (ln {regime['classes']} = "
        f"{regime['chance_loss']:.2f}; the paper's JFT-4B losses are 23-29% of theirs)."
    )
    if regime["early_transient"]:
        text += (
            " Above half of chance a study is in its early transient, where the loss falls faster than a power law "
            "and the findings on model size and learning rate cannot show: train longer or on an easier task."
        )
    return text


def _loss_section(result: dict[str, Any], images: dict[str, str]) -> list[Block]:
    blocks: list[Block] = [Heading("Held-out loss vs compute"), Image(images["loss_vs_compute"], "loss vs compute")]
    fit = result["power_law"]
    if fit:
        blocks.append(
            Paragraph(
                f"Frontier (cells on the envelope of the per-model curves): L = {_g(fit['a'], 4)} · "
                f"C^(-{_g(fit['b'], 4)}) over {fit['n']} points, {100 * fit['level']:.0f}% CI of the exponent "
                f"{_interval(fit['b_interval'])}; curvature of log L in log C {_g(fit['curvature'])} "
                f"{_interval(fit['curvature_interval'])}. R² = {_g(fit['r2'], 4)} is shown, not tested: an exact "
                "power law with noise can score low, a saturating curve high."
            )
        )
    else:
        blocks.append(Paragraph("No power law fitted: fewer than two frontier points."))
    return blocks


def _parametric_section(result: dict[str, Any]) -> list[Block]:
    blocks: list[Block] = [Heading("Parametric law L(N, D) = E + A/N^α + B/D^β")]
    fit = result["parametric"]
    if not fit:
        return blocks + [Paragraph(f"Not fitted: {result.get('parametric_error') or 'too few cells'}.")]
    unquoted = fit.get("unquoted") or {}
    rows = tuple(
        (
            name,
            "not quoted" if name in unquoted else _g(fit[name], 4),
            "–" if name in unquoted else _interval(fit["intervals"].get(name), 3),
        )
        for name in ("E", "A", "alpha", "B", "beta")
    )
    axis = "parameters without the classifier head" if fit["size_axis"] == "params" else "MACs per image"
    text = (
        f"N = {axis}, D = examples seen. Least squares on relative residuals by variable projection (E, A, B solved "
        f"exactly for every (α, β) on a refined grid; no start to get stuck at), over {fit['n']} cells "
        f"({fit['n_sizes']} model sizes); intervals from the bootstrap over runs."
    )
    if fit["optimal_size_exponent"] is not None:
        text += (
            f" Its compute-optimal allocation: N_opt ∝ C^{_g(fit['optimal_size_exponent'])}, "
            f"D_opt ∝ C^{_g(fit['optimal_data_exponent'])}."
        )
    blocks.append(Paragraph(text))
    blocks.append(Table(("parameter", "estimate", f"{100 * fit['level']:.0f}% CI"), rows))
    notes = [f"{name} not quoted: {why}" for name, why in unquoted.items()] + list(fit["warnings"])
    if notes:
        blocks.append(Paragraph("**What these runs cannot tell:**"))
        blocks.append(Bullets(tuple(notes)))
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
    optimal = result["compute_optimal"]
    interior = [row for row in optimal["isoflop"] if row["interior"]]
    if optimal["isoflop"]:
        a_ci = optimal["size_exponent_interval"]
        blocks.append(
            Paragraph(
                f"Read off the envelope at {len(optimal['isoflop'])} compute levels (Hoffmann et al. 2022, Approach "
                f"2): the optimum lies strictly inside the ladder at {len(interior)}"
                + (
                    f"; N_opt ∝ C^{_g(optimal['size_exponent'])} ({_interval(a_ci, 2)}), so epochs grow as "
                    f"C^{_g(1 - optimal['size_exponent'])}."
                    if optimal["size_exponent"] is not None
                    else "."
                )
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
    if predicted:
        blocks.append(
            Table(
                ("core-hours", "model", "epochs", "predicted loss", "interval", "note"),
                tuple(
                    (
                        _g(r["core_hours"]),
                        r["model"],
                        _g(r["epochs"]),
                        _g(r["predicted_loss"], 4),
                        _interval(r["loss_interval"], 3),
                        "largest model tried: a larger one may be better" if r["at_largest_model"] else "",
                    )
                    for r in predicted
                ),
                caption="Predicted by the parametric law among the trained models, up to 100x the largest compute.",
            )
        )
    return blocks


def _lr_section(result: dict[str, Any], images: dict[str, str]) -> list[Block]:
    lr = result["lr"]
    table = lr["by_epochs"]
    blocks: list[Block] = [Heading("Optimal learning rate vs epoch budget")]
    if not table:
        return blocks + [Paragraph("No cell tried more than one learning rate.")]
    blocks.append(Image(images["lr_vs_epochs"], "optimal learning rate vs epochs"))
    if lr["epochs_slope"] is not None:
        blocks.append(
            Paragraph(
                f"Regressing log lr* on log epochs (and log size) over the cells with an interior optimum: "
                f"lr* ∝ epochs^{_g(lr['epochs_slope'])} {_interval(lr['epochs_slope_interval'], 2)}."
            )
        )
    failed = _failed_trials(result)
    rows = tuple(
        (
            model,
            _g(r["epochs"]),
            _g(r["lr"]),
            _g(r["optimum"]),
            ", ".join(
                [_g(x) for x in r["lrs"]]
                + [f"{_g(x)} (diverged)" for x in failed.get((model, float(r["epochs"])), ()) if x not in r["lrs"]]
            ),
            "yes" if r["at_edge"] else "",
        )
        for model, entries in sorted(table.items())
        for r in entries
    )
    blocks.append(Table(("model", "epochs", "best lr", "optimum (parabola)", "lrs tried", "at grid edge"), rows))
    if failed:
        blocks.append(
            Paragraph(
                "A learning rate marked diverged was tried (`tuning.jsonl`) and stopped at a non-finite loss: it "
                "has no held-out loss, so the fits and the optimum above do not use it."
            )
        )
    return blocks


def _failed_trials(result: dict[str, Any]) -> dict[tuple[str, float], list[float]]:
    """The learning rates of each (model, epochs) cell whose tuning trial failed (a non-finite loss), by cell."""
    out: dict[tuple[str, float], list[float]] = {}
    for decision in result["tuning"]["decisions"]:
        trials, epochs = decision["trials"], decision["epochs"]
        if not isinstance(trials, list) or not isinstance(epochs, int | float):
            continue
        for trial in trials:
            if isinstance(trial, dict) and trial.get("status") == "failed" and isinstance(trial.get("lr"), int | float):
                out.setdefault((decision["model"], float(epochs)), []).append(float(trial["lr"]))
    return out


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
            ", ".join(
                _g(t.get("lr")) + (" (diverged)" if t.get("status") == "failed" else "")
                for t in d["trials"]
                if isinstance(t, dict)
            ),
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
    blocks: list[Block] = [Heading("Back-test: predicting the largest runs")]
    fit = result["power_law"]
    test = fit["backtest"] if fit else None
    if not test or test["error"] is None:
        return blocks + [Paragraph("Too few frontier points to hold out the largest third and fit the rest.")]
    if "backtest" in images:
        blocks.append(Image(images["backtest"], "back-test"))
    blocks.append(
        Paragraph(
            f"A line fitted to the {int(test['trained_on'])} cheaper frontier points predicts the "
            f"{int(test['held_out'])} in the largest third of the compute range with a mean log error of "
            f"{_g(test['error'])} (the noise alone gives a standard error of "
            f"{_g((result['noise']['sigma'] or 0) * (test['leverage'] or 0) ** 0.5)})."
        )
    )
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
                    (
                        p["model"],
                        p["dataset"],
                        "none (scratch)" if p.get("scratch") else _g(p["pretrain_core_hours"]),
                        f"{p['top1']:.2f}",
                        p["run"],
                    )
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
    blocks: list[Block] = [Heading("Families at equal compute"), Image(images["families"], "families")]
    fits = [
        f"{name}: frontier L ~ C^-{_g(entry['b'], 4)} over {len(entry['frontier'])} points"
        for name, entry in sorted(comparison["families"].items())
        if entry.get("b") is not None
    ]
    if fits:
        blocks.append(Bullets(tuple(fits)))
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
    if result["other_data"]:
        blocks.append(Heading("Runs on other data (left out)", 3))
        blocks.append(Table(("run", "data"), tuple((r["name"], r["data"]) for r in result["other_data"])))
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
