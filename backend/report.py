"""The project report behind ``GET /report/<project>`` (HTML with PNG plots) and ``/report/<project>.json``.

Everything is read from what the fits recorded (the served version's metrics, the T history, the assistant's
``assistant.json``) and from the offline benchmark's curves: a report never fetches tasks, trains or touches Label
Studio, so it answers in well under a second.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from backend.protocol import InvalidInput

BENCHMARK_DIR = Path(__file__).resolve().parent.parent / "bench" / "results" / "simulate"


def build_report(backend: Any, project_id: int) -> dict[str, Any]:
    """The report's data (the JSON route answers exactly this); 404 for a project without a fitted model."""
    state = backend.state(project_id)
    current = state.current()
    record = backend.assistant.load(state)
    if current is None and not record:
        raise InvalidInput(f"project {project_id} has no fitted model yet: label a few tasks first", 404, "not_found")
    config = backend.config
    ctx = backend.projects.context(project_id)
    base_url = (ctx.hostname or config.label_studio_url or "").rstrip("/")
    metrics = current.metrics if current is not None else {}
    history = state.transition_history()
    last_t = history[-1] if history else {}
    balance = record.get("class_balance") or {}
    issues = [{**issue, "url": f"{base_url}/projects/{project_id}/data?task={issue['task']}" if base_url else None}
              for issue in record.get("label_issues") or []]
    n_fine = int((record.get("ledger") or {}).get("human_fine", metrics.get("n_fine", 0)) or 0)
    return {
        "project": project_id,
        "model_version": current.model_version if current is not None else None,
        "fitted_at": current.created_at if current is not None else None,
        "ledger": record.get("ledger") or {},
        "stopping": {**(record.get("stopping") or {}), "curve": record.get("curve"), "fit": record.get("curve_fit")},
        "transition": {
            "coarse_classes": last_t.get("coarse_classes") or [],
            "matrix": last_t.get("matrix") or [],
            "row_support": last_t.get("row_support") or [],
            "n_trusted": last_t.get("n_trusted"),
            "model_version": last_t.get("model_version"),
        },
        "class_balance": balance,
        "queue": record.get("queue") or {},
        "savings": savings_against_random(balance.get("classes") or [], config.weak_annotator, n_fine),
        "auto_accept": {
            "enabled": config.auto_accept_precision > 0,
            "target": config.auto_accept_precision or None,
            "audit_share": config.auto_accept_audit_share,
            "user": config.auto_accept_user,
            **(record.get("audit_summary") or {}),
            "thresholds": record.get("thresholds") or [],
            "n_auto_accepted": len(record.get("auto_accepted") or {}),
            "pending_audits": sum(1 for a in (record.get("audits") or {}).values() if a.get("human") is None),
        },
        "label_errors": issues,
        "label_errors_tab": "Likely label errors" if config.label_errors_tab else None,
    }


def savings_against_random(fine_classes: list[str], weak_annotator: str, n_fine: int) -> dict[str, Any]:
    """Human labels saved against random sampling at this many labels, read from the offline benchmark's curves
    of the data set with these classes (ours vs random, same weak annotator, or the simulated one)."""
    for path in sorted(BENCHMARK_DIR.glob("*/results.json")):
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        classes = ((results.get("config") or {}).get("hierarchy_classes") or {}).get("fine_classes")
        if not classes or set(classes) != set(fine_classes):  # the same classes, whatever the config's order
            continue
        condition = weak_annotator if weak_annotator in results else "simulated"
        strategies = (results.get(condition) or {}).get("strategies") or {}
        if "ours" not in strategies or "random" not in strategies:
            continue
        ours_n = np.asarray(strategies["ours"]["labels_per_round_mean"]["human_fine"], dtype=float)
        ours_acc = np.asarray(strategies["ours"]["accuracy_mean"], dtype=float)
        random_n = np.asarray(strategies["random"]["labels_per_round_mean"]["human_fine"], dtype=float)
        random_acc = np.maximum.accumulate(np.asarray(strategies["random"]["accuracy_mean"], dtype=float))
        at = float(np.clip(n_fine, ours_n.min(), ours_n.max()))
        accuracy = float(np.interp(at, ours_n, ours_acc))
        reached = random_acc >= accuracy
        random_needs = float(np.interp(accuracy, random_acc, random_n)) if reached.any() else None
        return {
            "benchmark": str(path.relative_to(BENCHMARK_DIR.parent.parent.parent)), "condition": condition,
            "at_labels": at, "ours_accuracy": round(accuracy, 4),
            "random_labels_for_same_accuracy": None if random_needs is None else round(random_needs, 1),
            "labels_saved": None if random_needs is None else round(random_needs - at, 1),
            "note": "random never reached that accuracy within the benchmark's budget" if random_needs is None
            else "read from the benchmark curve; clamped to its label range",
            "curves": {"ours": {"labels": ours_n.tolist(), "accuracy": ours_acc.tolist()},
                       "random": {"labels": random_n.tolist(),
                                  "accuracy": strategies["random"]["accuracy_mean"]}},
        }
    return {"benchmark": None, "note": "no offline benchmark has this project's classes"}


# --- HTML ---------------------------------------------------------------------------------------------------------


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _plots(report: Mapping[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from model.assistant.stopping import InversePowerLaw

    plots: dict[str, str] = {}
    stopping = report["stopping"]
    curve, fit = stopping.get("curve"), stopping.get("fit")
    suggestion = (stopping.get("suggestion") or {})
    if curve and curve.get("sizes"):
        figure, axis = plt.subplots(figsize=(6, 3.4))
        axis.errorbar(curve["sizes"], [100 * a for a in curve["accuracy"]], yerr=[100 * s for s in curve["spread"]],
                      fmt="o", label="cross-validated on human labels")
        n_now = int(suggestion.get("n_labels") or curve["n_labels"])
        horizon = max(n_now * 2, int(suggestion.get("suggested_labels") or 0) * 1.2, max(curve["sizes"]) * 2)
        if fit:
            law = InversePowerLaw(fit["a"], fit["b"], fit["c"])
            xs = np.linspace(min(curve["sizes"]), horizon, 200)
            axis.plot(xs, 100 * law(xs), label="inverse power law fit")
        axis.axvline(n_now, color="grey", linestyle=":", label=f"now: {n_now} labels")
        if suggestion.get("suggested_labels"):
            axis.axvline(suggestion["suggested_labels"], color="green", linestyle="--", label="suggested stop")
        axis.set_xlabel("human fine labels")
        axis.set_ylabel("fine accuracy (%)")
        axis.set_title(suggestion.get("text") or "", fontsize=9)
        axis.legend(fontsize=7)
        plots["curve"] = _png(figure)
    t = report["transition"]
    if t.get("matrix"):
        matrix = np.asarray(t["matrix"], dtype=float)
        names = t["coarse_classes"]
        support = t.get("row_support") or [0] * len(names)
        figure, axis = plt.subplots(figsize=(5, 4))
        axis.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                axis.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8,
                          color="white" if matrix[i, j] > 0.6 else "black")
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        axis.set_yticks(range(len(names)), [f"{n} (n={int(s)})" for n, s in zip(names, support)], fontsize=8)
        axis.set_xlabel("VLM says")
        axis.set_ylabel("true coarse class (support)")
        axis.set_title(f"T of {t.get('model_version')}", fontsize=9)
        plots["transition"] = _png(figure)
    balance = report["class_balance"]
    if balance.get("classes"):
        names = balance["classes"]
        human = np.asarray(balance["human"], dtype=float)
        pool = np.asarray(balance["pool_predicted"], dtype=float)
        figure, axis = plt.subplots(figsize=(6, 3.2))
        x = np.arange(len(names))
        axis.bar(x - 0.2, 100 * human / max(human.sum(), 1), 0.4, label=f"human labels ({int(human.sum())})")
        axis.bar(x + 0.2, 100 * pool / max(pool.sum(), 1), 0.4, label=f"pool, predicted ({int(pool.sum())})")
        axis.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        axis.set_ylabel("share (%)")
        axis.legend(fontsize=7)
        plots["balance"] = _png(figure)
    ledger = report["ledger"]
    if ledger:
        sources = ["human_fine", "human_coarse", "vlm", "auto_accepted"]
        counts = [int(ledger.get(s, 0)) for s in sources]
        cost = ledger.get("cost") or {}
        figure, axis = plt.subplots(figsize=(6, 2.8))
        bars = axis.barh(sources, counts, color=["#1f77b4", "#6baed6", "#ff7f0e", "#2ca02c"])
        for bar, source in zip(bars, sources):
            axis.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" cost {cost.get(source, 0):g}",
                      va="center", fontsize=8)
        axis.set_xlabel("labels")
        axis.set_title(f"label ledger: total cost {ledger.get('cost_total', 0):g}", fontsize=9)
        plots["ledger"] = _png(figure)
    savings = report["savings"]
    if savings.get("curves"):
        figure, axis = plt.subplots(figsize=(6, 3.2))
        for name, data in savings["curves"].items():
            axis.plot(data["labels"], [100 * a for a in data["accuracy"]], marker="o", label=name)
        axis.axvline(savings["at_labels"], color="grey", linestyle=":", label="this project")
        axis.set_xlabel("human fine labels (benchmark)")
        axis.set_ylabel("test accuracy (%)")
        saved = savings.get("labels_saved")
        axis.set_title("labels saved against random: " + ("n/a" if saved is None else f"{saved:g}"), fontsize=9)
        axis.legend(fontsize=7)
        plots["savings"] = _png(figure)
    queue = report["queue"]
    if queue:
        parts = {"pending audits": queue.get("pending_audits", 0), "planned picks": queue.get("planned_picks", 0),
                 "rest of the queue": max(int(queue.get("n_unlabeled", 0)) - int(queue.get("pending_audits", 0))
                                          - int(queue.get("planned_picks", 0)) - int(queue.get("auto_accepted", 0)),
                                          0),
                 "auto-accepted": queue.get("auto_accepted", 0)}
        figure, axis = plt.subplots(figsize=(6, 2.4))
        axis.barh(list(parts), list(parts.values()), color=["#d62728", "#1f77b4", "#aaaaaa", "#2ca02c"])
        axis.set_xlabel("tasks")
        axis.set_title("queue composition", fontsize=9)
        plots["queue"] = _png(figure)
    return plots


def render_html(report: Mapping[str, Any]) -> str:
    plots = _plots(report)
    e = html.escape

    def image(name: str, alt: str) -> str:
        return f'<img alt="{e(alt)}" src="{plots[name]}">' if name in plots else f"<p>{e(alt)}: not yet.</p>"

    suggestion = (report["stopping"].get("suggestion") or {}).get("text") or "no learning curve yet"
    stabilizing = report["stopping"].get("stabilizing") or {}
    average = stabilizing.get("average")
    kappa_text = (f"{average:.3f}" if average is not None
                  else f"not yet ({len(stabilizing.get('kappas') or [])} of {stabilizing.get('window', 3)} pairs)")
    auto = report["auto_accept"]
    if auto["enabled"]:
        precision = auto.get("audited_precision")
        auto_text = (f"target {auto['target']:.2f}, audit share {auto['audit_share']:.2f}; "
                     f"{auto['n_auto_accepted']} auto-accepted (user {e(auto['user'])}), "
                     f"{auto['pending_audits']} audits pending; audited precision "
                     f"{'n/a' if precision is None else f'{precision:.3f}'}")
        paused = auto.get("paused") or []
        auto_text += f"; <b>paused</b> for {e(', '.join(paused))}" if paused else "; no class paused"
    else:
        auto_text = "off (set AUTO_ACCEPT_PRECISION, e.g. 0.95)"
    rows = "".join(
        f"<tr><td>{issue['task']}</td><td>{e(issue['given'])}</td><td>{e(issue['suggested'])}</td>"
        f"<td>{issue['quality']:.3f}</td><td>"
        + (f'<a href="{e(issue["url"])}">open task</a>' if issue.get("url") else "")
        + "</td></tr>"
        for issue in report["label_errors"][:20]
    ) or '<tr><td colspan="5">none flagged</td></tr>'
    ledger = report["ledger"]
    tab = report.get("label_errors_tab")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Project {report['project']} report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:1em auto;padding:0 1em}}
section{{display:inline-block;vertical-align:top;margin:0 1em 1em 0}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:90%}}</style></head><body>
<h1>Project {report['project']}: labeling report</h1>
<p>Model <b>{e(str(report['model_version']))}</b>, fitted {e(str(report['fitted_at']))}.
Labels: {ledger.get('human_fine', 0)} human fine, {ledger.get('human_coarse', 0)} human coarse,
{ledger.get('vlm', 0)} VLM, {ledger.get('auto_accepted', 0)} auto-accepted.</p>
<h2 id="stopping">When to stop</h2><p id="suggestion"><b>{e(suggestion)}</b>.
Stabilizing predictions (KappaAverage: mean Cohen's kappa of the last {stabilizing.get('window', 3)} pairs of
consecutive models on the stop set): {kappa_text} (stop at {stabilizing.get('threshold', 0.99)}).</p>
<section>{image('curve', 'Estimated accuracy against labels')}</section>
<section>{image('savings', 'Savings against random sampling')}</section>
<h2>Noise model and balance</h2>
<section>{image('transition', 'T heatmap')}</section><section>{image('balance', 'Class balance')}</section>
<h2>Ledger and queue</h2>
<section>{image('ledger', 'Label ledger')}</section><section>{image('queue', 'Queue composition')}</section>
<h2 id="auto-accept">Auto-accept</h2><p>{auto_text}</p>
<h2 id="label-errors">Likely label errors</h2>
<p>Human labels the model, trained without them, contradicts (cleanlab){'; also the Data Manager tab <i>' + e(tab) + '</i>' if tab else ''}.</p>
<table><tr><th>task</th><th>labeled</th><th>model says</th><th>label quality</th><th></th></tr>{rows}</table>
<p><a href="/report/{report['project']}.json">JSON</a></p>
</body></html>"""
