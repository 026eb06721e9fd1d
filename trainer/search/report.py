"""The end-of-search report: report.json, report.md and plots (matplotlib, PNG).

Plots: held-out rotation accuracy per base candidate; objective per trial for each fold and
repeat (with the running best); expected strength per op of the found policy (the paper's
Fig. 2.10, see `policy.expected_strength`); MoCo loss curves of the folds and the retraining.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selfaugment.trainer.search.base_selection import describe_separation, final_scores, separation
from selfaugment.trainer.search.planner import base_candidates, base_rungs, identity_ops
from selfaugment.trainer.search.status import describe_skipped, skipped_images
from selfaugment.trainer.spec import AugmentSearchSpec
from selfaugment.trainer.store import ArtifactStore
from selfaugment.trainer.store.layout import (
    POLICY_KEY,
    REPORT_JSON_KEY,
    REPORT_MD_KEY,
    read_results,
    spec_digest,
)


def _figure_bytes(draw: Callable[[Any], None], width: float = 7.0, height: float = 3.6) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(width, height), dpi=110)
    draw(axes)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _plot_base(results: dict[str, dict[str, Any]]) -> bytes:
    rows = sorted(results.values(), key=lambda r: r["rotation_accuracy"], reverse=True)

    def draw(axes: Any) -> None:
        names = [row["transform"] for row in rows]
        values = [100 * row["rotation_accuracy"] for row in rows]
        colours = ["tab:green"] + ["tab:blue"] * (len(rows) - 1)
        axes.barh(names[::-1], values[::-1], color=colours[::-1])
        axes.axvline(25, color="grey", linestyle=":", label="chance (25%)")
        axes.set_xlabel("held-out rotation accuracy (%)")
        axes.set_title("Base policy: rotation score per single transform")
        axes.legend(loc="lower right")

    return _figure_bytes(draw, height=max(3.0, 0.3 * len(rows) + 1))


def _base_section(
    spec: AugmentSearchSpec, results: dict[str, dict[str, Any]]
) -> tuple[list[str], bytes, dict[str, Any]] | None:
    """The base-policy part of the report: markdown lines, the plot, and report.json's fields.

    Every candidate shows its score at the last rung it reached; the last rung's candidates
    show the mean over their seeds with its standard error, and a line says whether the
    winner is separated from the runner-up beyond that uncertainty."""
    if not results:
        return None
    rungs = base_rungs(spec)
    final = final_scores(spec, results)
    verdict = separation(final)
    latest = _latest_per_candidate(results)
    for score in final:  # the last rung: the mean over seeds
        latest[score.transform] = {
            **latest[score.transform],
            "rotation_accuracy": score.accuracy,
            "rotation_loss": score.loss,
        }
    rows = sorted(latest.values(), key=lambda r: (-r.get("rung", 0), -r["rotation_accuracy"]))
    selection = _base_selection(spec, results)
    selection["final"] = [score.to_dict() for score in final]
    selection["separation"] = verdict
    md = ["## Base policy", ""]
    if len(rungs) > 1:
        scores = _scores_per_rung(results)
        for score in final:  # the last rung's cell: the mean over its seeds
            scores[score.transform][rungs[-1].index] = score.accuracy
        md += [
            f"Successive halving (eta {spec.search.base_selection.eta}): "
            f"{selection['epochs_trained']} candidate-epochs trained instead of "
            f"{selection['epochs_exhaustive']} for the exhaustive stage with one seed each "
            f"({selection['epochs_exhaustive'] / selection['epochs_trained']:.1f}x fewer), "
            f"{selection['worker_seconds']:.0f} worker-seconds. Held-out rotation accuracy "
            "per rung; a blank cell is where a candidate was stopped.",
            "",
            _table(
                ["transform", *[f"rung {r.index} ({r.epochs} ep)" for r in rungs]],
                [
                    [r["transform"], *[scores[r["transform"]].get(g.index, "") for g in rungs]]
                    for r in rows
                ],
            ),
            "",
        ]
    else:
        md += [
            _table(
                ["transform", "rotation accuracy", "rotation loss", "final MoCo loss"],
                [
                    [
                        r["transform"],
                        r["rotation_accuracy"],
                        r["rotation_loss"],
                        r.get("final_loss"),
                    ]
                    for r in rows
                ],
            ),
            "",
        ]
    if spec.search.base_selection.seeds > 1 or len(rungs) > 1:
        md += [
            f"Final comparison ({rungs[-1].epochs} epochs, "
            f"{spec.search.base_selection.seeds} training seed(s) each):",
            "",
            _table(
                ["transform", "rotation accuracy", "standard error", "seeds"],
                [[f.transform, f.accuracy, f.standard_error, f.seeds] for f in final],
            ),
            "",
        ]
    line = describe_separation(verdict)
    if line:
        md += [f"**Choice:** {line}.", ""]
    left_out = sorted(identity_ops(spec))
    if left_out:
        md += [
            f"Left out of the candidates and of the search space, as the identity on "
            f"{spec.dataset.channels}-channel images: {', '.join(left_out)}.",
            "",
        ]
    md += ["![base candidates](plots/base_candidates.png)", ""]
    fields = {
        "base_candidates": {
            name: {
                "rotation_accuracy": r["rotation_accuracy"],
                "rotation_loss": r["rotation_loss"],
                "rung": r.get("rung", 0),
                "epochs": r.get("epochs", spec.search.base_epochs),
            }
            for name, r in latest.items()
        },
        "base_selection": selection,
    }
    return md, _plot_base(latest), fields


def _latest_per_candidate(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each base candidate's result at the last rung it reached."""
    latest: dict[str, dict[str, Any]] = {}
    for result in results.values():
        name = result["transform"]
        if name not in latest or result.get("rung", 0) > latest[name].get("rung", 0):
            latest[name] = result
    return latest


def _scores_per_rung(results: dict[str, dict[str, Any]]) -> dict[str, dict[int, float]]:
    scores: dict[str, dict[int, float]] = {}
    for result in results.values():
        scores.setdefault(result["transform"], {})[result.get("rung", 0)] = result[
            "rotation_accuracy"
        ]
    return scores


def _base_selection(spec: AugmentSearchSpec, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """How the base was chosen and what it cost: rungs, epochs trained against exhaustive."""
    rungs = base_rungs(spec)
    before = {rung.index: rungs[rung.index - 1].epochs if rung.index else 0 for rung in rungs}
    trained = sum(
        int(r.get("epochs", spec.search.base_epochs))
        - (before.get(int(r.get("rung", 0)), 0) if r.get("continued_from") else 0)
        for r in results.values()
    )
    return {
        "method": spec.search.base_selection.method if len(rungs) > 1 else "exhaustive",
        "rungs": [{"rung": r.index, "epochs": r.epochs, "candidates": r.candidates} for r in rungs],
        "epochs_trained": trained,
        "epochs_exhaustive": len(base_candidates(spec)) * spec.search.base_epochs,
        "worker_seconds": round(sum(float(r.get("seconds", 0.0)) for r in results.values()), 1),
    }


def _plot_trials(results: dict[str, dict[str, Any]], objective: str) -> bytes:
    def draw(axes: Any) -> None:
        for task_id, result in sorted(results.items()):
            history = result.get("objective_history", [])
            running, best = [], float("inf")
            for value in history:
                best = min(best, value)
                running.append(best)
            line = axes.plot(range(1, len(history) + 1), history, ".", alpha=0.35)
            axes.plot(
                range(1, len(running) + 1),
                running,
                "-",
                color=line[0].get_color(),
                label=task_id.removeprefix("search-"),
            )
        axes.set_xlabel("trial")
        axes.set_ylabel(f"objective ({objective}, lower is better)")
        axes.set_title("TPE search: objective per trial and running best")
        axes.legend(fontsize="small", ncol=2)

    return _figure_bytes(draw)


def _plot_strength(summary: dict[str, float]) -> bytes:
    def draw(axes: Any) -> None:
        names = list(summary)
        axes.bar(names, [summary[name] for name in names], color="tab:purple")
        axes.set_ylabel("expected strength (p x magnitude)")
        axes.set_title("Found policy: expected strength per op")
        axes.tick_params(axis="x", rotation=60)

    return _figure_bytes(draw)


def _plot_losses(curves: dict[str, list[float]]) -> bytes:
    def draw(axes: Any) -> None:
        for name, losses in curves.items():
            axes.plot(range(1, len(losses) + 1), losses, label=name)
        axes.set_xlabel("epoch")
        axes.set_ylabel("InfoNCE loss")
        axes.set_title("MoCo training curves")
        axes.legend(fontsize="small")

    return _figure_bytes(draw)


def _plot_randaugment(results: dict[str, dict[str, Any]]) -> bytes:
    def draw(axes: Any) -> None:
        for n in sorted({r["n"] for r in results.values()}):
            rows = sorted((r for r in results.values() if r["n"] == n), key=lambda r: r["m"])
            axes.plot(
                [r["m"] for r in rows],
                [100 * r["rotation_accuracy"] for r in rows],
                "o-",
                label=f"N = {n}",
            )
        axes.set_xlabel("magnitude M (0..30)")
        axes.set_ylabel("held-out rotation accuracy (%)")
        axes.set_title("SelfRandAugment grid")
        axes.legend()

    return _figure_bytes(draw)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(store: ArtifactStore, spec: AugmentSearchSpec, workdir: Path) -> dict[str, Any]:
    """Write report.json, report.md and plots/*.png to the store; returns the report."""
    results = read_results(store)
    by_prefix: dict[str, dict[str, dict[str, Any]]] = {}
    for prefix in ("base-", "fold-", "search-", "randaugment-"):
        by_prefix[prefix] = {k: v for k, v in results.items() if k.startswith(prefix)}
    retrain = results.get("retrain", {})
    merge = results.get("merge", {})
    plots: dict[str, bytes] = {}
    title = (
        "SelfRandAugment"
        if spec.search.algorithm == "selfrandaugment"
        else (f"SelfAugment, objective {spec.search.objective}")
    )
    md = [f"# Search report ({title})", ""]
    md.append(
        f"Dataset `{spec.dataset.uri}`, model {spec.model.arch} width {spec.model.width}, "
        f"spec digest `{spec_digest(spec)}`."
    )
    prepared = results.get("prepare", {}).get("prepared")
    if prepared:
        md.append("")
        md.append(
            f"Prepared once as `{prepared['uri']}`: {prepared['count']} images, stored at "
            f"{prepared['storage_size']} px, digest `{str(prepared['digest'])[:16]}`."
        )
    skipped = skipped_images(results)
    if skipped:
        md.append("")
        md.append(f"**Data:** {describe_skipped(skipped, shown=len(skipped['files']))}.")
    md.append("")

    base_section = _base_section(spec, by_prefix["base-"])
    if base_section is not None:
        base_lines, plots["base_candidates.png"], base_json = base_section
        md += base_lines
    else:
        base_json = {"base_candidates": {}, "base_selection": None}
    if by_prefix["fold-"]:
        folds = by_prefix["fold-"]
        md += [
            "## Folds (base policy " + str(next(iter(folds.values()))["base_policy"]) + ")",
            "",
            _table(
                ["fold", "rotation accuracy", "base rotation loss", "base InfoNCE"],
                [
                    [
                        r["fold"],
                        r["rotation_accuracy"],
                        r["base_losses"]["rotation_loss"],
                        r["base_losses"]["infonce"],
                    ]
                    for r in folds.values()
                ],
            ),
            "",
        ]
    if by_prefix["search-"]:
        plots["objective_per_trial.png"] = _plot_trials(by_prefix["search-"], spec.search.objective)
        md += [
            "## Search",
            "",
            _table(
                ["fold", "repeat", "trials", "best objective"],
                [
                    [r["fold"], r["repeat"], r["trials_done"], r["best_objective"]]
                    for r in by_prefix["search-"].values()
                ],
            ),
            "",
            "![objective per trial](plots/objective_per_trial.png)",
            "",
        ]
    if by_prefix["randaugment-"]:
        plots["randaugment_grid.png"] = _plot_randaugment(by_prefix["randaugment-"])
        grid = sorted(
            by_prefix["randaugment-"].values(),
            key=lambda r: (-r["rotation_accuracy"], r["rotation_loss"]),
        )
        md += [
            "## SelfRandAugment grid",
            "",
            "RandAugment (N ops per image, magnitude M of 30), one MoCo model each, ranked by "
            "held-out rotation accuracy; the first row is retrained.",
            "",
            _table(
                ["N", "M", "rotation accuracy", "rotation loss", "final MoCo loss"],
                [
                    [
                        r["n"],
                        r["m"],
                        r["rotation_accuracy"],
                        r["rotation_loss"],
                        r.get("final_loss"),
                    ]
                    for r in grid
                ],
            ),
            "",
            "![grid](plots/randaugment_grid.png)",
            "",
        ]
    if merge.get("policy_summary"):
        plots["policy_strength.png"] = _plot_strength(merge["policy_summary"])
        md += [
            "## Found policy",
            "",
            f"{merge['sub_policies']} sub-policies (from {merge['candidates']} top candidates), "
            f"stored at `{store.url(POLICY_KEY)}`.",
            "",
            "![expected strength per op](plots/policy_strength.png)",
            "",
        ]
    curves = {
        task_id: result["loss_history"]
        for task_id, result in results.items()
        if result.get("loss_history") and (task_id.startswith("fold-") or task_id == "retrain")
    }
    if curves:
        plots["training_curves.png"] = _plot_losses(curves)
        md += ["## Training", "", "![training curves](plots/training_curves.png)", ""]
    if retrain:
        figures = {k: v for k, v in retrain.items() if k.endswith(("_accuracy", "_loss"))}
        md += [
            "## Final model",
            "",
            f"Policy `{retrain.get('policy')}`.",
            "",
            _table(["metric", "value"], [[k, v] for k, v in sorted(figures.items())]),
            "",
        ]

    for name, data in plots.items():
        store.write_bytes(f"plots/{name}", data)
    report = {
        "schema_version": 1,
        "algorithm": spec.search.algorithm,
        "objective": spec.search.objective,
        "spec_digest": spec_digest(spec),
        "base_policy": next(iter(by_prefix["fold-"].values()), {}).get("base_policy"),
        **base_json,
        "left_out_ops": sorted(identity_ops(spec)),
        "folds": {
            k: {"rotation_accuracy": v["rotation_accuracy"], **v["base_losses"]}
            for k, v in by_prefix["fold-"].items()
        },
        "search": {
            k: {"best_objective": v["best_objective"], "trials": v["trials_done"]}
            for k, v in by_prefix["search-"].items()
        },
        "randaugment": {
            k: {"n": v["n"], "m": v["m"], "rotation_accuracy": v["rotation_accuracy"]}
            for k, v in by_prefix["randaugment-"].items()
        },
        "policy_uri": store.url(POLICY_KEY) if store.exists(POLICY_KEY) else None,
        "policy_summary": merge.get("policy_summary", {}),
        "final": {k: v for k, v in retrain.items() if k.endswith(("_accuracy", "_loss"))},
        "task_seconds": {k: v.get("seconds") for k, v in results.items()},
        "skipped_images": skipped,
        "prepared": prepared,
        "plots": [f"plots/{name}" for name in plots],
    }
    store.write_json(REPORT_JSON_KEY, report)
    store.write_bytes(REPORT_MD_KEY, "\n".join(md).encode())
    return {
        "report": store.url(REPORT_JSON_KEY),
        "markdown": store.url(REPORT_MD_KEY),
        "plots": report["plots"],
    }
