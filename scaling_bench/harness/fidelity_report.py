"""Fidelity harness, part 3: issue targets, markdown table, plot and printed summary."""

from __future__ import annotations

import sys
from pathlib import Path

from scaling_bench.harness.report import bkey

RANDOM_WEIGHTS_NOTE = (
    "random-init weights: attention is nearly uniform (see `concentration`), so every method looks good; "
    "judge retrieval on real weights (dino-smollm2)"
)
REAL_WEIGHTS_NOTE = (
    "real weights: DINOv2-small patches of real video -> fixed random projector -> SmolLM2-135M-Instruct"
)


# ---------------------------------------------------------------------------------------------------
# Output: JSON, PNG, markdown table
# ---------------------------------------------------------------------------------------------------


def table_markdown(results: dict) -> str:
    lines = []
    for model, res in results["models"].items():
        lines.append(f"### {model} ({res['weights']} weights)\n")
        lines.append(f"_{res['note']}._  ")
        st = res["stream"]
        lines.append(
            f"Stream: {st['tokens']} tokens ({st['frames']} frames of {', '.join(v['name'] for v in st['videos'])}, "
            f"{st['captions']} captions, {len(res['questions'])} questions), past at the questions "
            f"{min(q['past_tokens'] for q in res['questions'])}-{max(q['past_tokens'] for q in res['questions'])} tokens; "
            f"{res['layout']['num_layers']} layers x {res['layout']['num_kv_heads']} KV heads. "
            f"Mass on sink + window: {res['resident_mass_mean']:.2f}. Top-B concentration (share of the past's "
            f"mass in its exact top-B): " + ", ".join(f"{k}: {v:.2f}" for k, v in res["concentration"].items())
            + f". Harness check (reference vs engine attention): {res['harness_check_rel_err']:.1e}.\n")
        lines.append("| method | budget | recall mean (worst layer) | past-only recall mean (worst) | out err mean (worst) "
                     "| copies / query | MB moved / query | device bytes (index part) |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for name, m in res["methods"].items():
            for b, a in m["budgets"].items():
                lines.append(
                    f"| {name} | {float(b):.0%} | {a['recall_mean']:.3f} ({a['recall_worst_layer']:.3f}, L{a['recall_worst_layer_index']}) "
                    f"| {a['past_recall_mean']:.3f} ({a['past_recall_worst_layer']:.3f}) "
                    f"| {a['out_err_mean']:.4f} ({a['out_err_worst_layer']:.4f}) | {a['copies_per_query']:.0f} "
                    f"| {a['bytes_per_query'] / 1e6:.2f} | {_fmt_bytes(m['device_bytes'])} ({_fmt_bytes(m['index_bytes'])}) |")
        past = max(q["past_tokens"] for q in res["questions"])
        sizes = [f"{name}: {m['clusters_per_head']:.0f} clusters/head (~{past / max(m['clusters_per_head'], 1):.1f} "
                 f"tokens each), {m['pending_splits_at_questions'][-1]} splits pending at the last question"
                 for name, m in res["methods"].items() if "clusters_per_head" in m]
        if sizes:
            lines.append("\nCluster index at the questions: " + "; ".join(sizes) + ".")
        if res.get("targets"):
            lines.append("\nTargets (issue 3), cluster vs token: " + "; ".join(
                f"{b}: recall {t['cluster_recall_mean']:.3f} {'ok' if t['recall_ge_0.95'] else 'MISS'}, "
                f"out err {t['out_err_ratio_vs_token']:.2f}x token {'ok' if t['out_err_le_1.1x_token'] else 'MISS'}, "
                f"{t['copies_ratio_token_over_cluster']:.1f}x fewer copies {'ok' if t['copies_10x_fewer'] else 'MISS'}"
                for b, t in res["targets"].items()))
        lines.append("")
    return "\n".join(lines)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    panels = [("recall_mean", "recall (sink+window+retrieved)\nvs exact top-B", False),
              ("past_recall_mean", "past-only recall vs exact top-B", False),
              ("out_err_mean", "attention-output rel. error", True),
              ("copies_per_query", "copy operations / query", True),
              ("past_recall_per_layer", "past-only recall per layer,\nsmallest budget", False)]
    fig, axes = plt.subplots(len(models), len(panels), figsize=(4.0 * len(panels), 3.6 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        res = results["models"][model]
        for j, (key, title, log_y) in enumerate(panels):
            ax = axes[i][j]
            for c, (name, m) in enumerate(res["methods"].items()):
                if name == "full" and key in ("out_err_mean", "copies_per_query"):
                    continue  # zero error and no copies: nothing to draw on a log axis
                style = "--" if " " in name else "-"
                if key.endswith("per_layer"):
                    ys = next(iter(m["budgets"].values()))[key]
                    ax.plot(range(len(ys)), ys, style, marker=".", color=f"C{c % 10}", label=name)
                    ax.set_xlabel("layer")
                else:
                    xs = [float(b) * 100 for b in m["budgets"]]
                    ax.plot(xs, [a[key] for a in m["budgets"].values()], style, marker="o", color=f"C{c % 10}", label=name)
                    ax.set_xlabel("budget, % of the past")
            if log_y:
                ax.set_yscale("log")
            ax.set_title(f"{model} ({res['weights']}): {title}", fontsize=9)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(results: dict, out=sys.stdout) -> None:
    for model, res in results["models"].items():
        print(f"\n{model} ({res['weights']} weights; {res['stream']['tokens']} tokens; "
              f"harness check {res['harness_check_rel_err']:.1e})", file=out)
        if res["weights"] != "real":
            print(f"  NOTE: {RANDOM_WEIGHTS_NOTE}", file=out)
        print(f"  {'method':<24}{'budget':>7}{'recall':>8}{'worst':>8}{'past':>7}{'out_err':>9}{'copies/q':>10}{'MB/q':>8}{'dev bytes':>11}", file=out)
        for name, m in res["methods"].items():
            for b, a in m["budgets"].items():
                print(f"  {name:<24}{float(b):>7.0%}{a['recall_mean']:>8.3f}{a['recall_worst_layer']:>8.3f}"
                      f"{a['past_recall_mean']:>7.3f}{a['out_err_mean']:>9.4f}{a['copies_per_query']:>10.0f}{a['bytes_per_query'] / 1e6:>8.2f}"
                      f"{_fmt_bytes(m['index_bytes']):>11}", file=out)


# ---------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------




def _targets(methods: dict, budgets: list[float]) -> dict:
    """Issue 3's targets, reported (never asserted): recall >= 0.95, out_err <= 1.1x token's, >= 10x fewer copies."""
    out = {}
    if "cluster" not in methods or "token" not in methods:
        return out
    for b in budgets:
        c, t = methods["cluster"]["budgets"][bkey(b)], methods["token"]["budgets"][bkey(b)]
        out[bkey(b)] = {
            "cluster_recall_mean": c["recall_mean"],
            "recall_ge_0.95": c["recall_mean"] >= 0.95,
            "out_err_ratio_vs_token": c["out_err_mean"] / max(t["out_err_mean"], 1e-30),
            "out_err_le_1.1x_token": c["out_err_mean"] <= 1.1 * t["out_err_mean"],
            "copies_ratio_token_over_cluster": t["copies_per_query"] / max(c["copies_per_query"], 1e-30),
            "copies_10x_fewer": t["copies_per_query"] >= 10 * c["copies_per_query"],
        }
    return out
