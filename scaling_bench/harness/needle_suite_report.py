"""Needle suite, part 2: the pooled table and plot."""

from __future__ import annotations

from pathlib import Path


def _cell(t: dict) -> str:
    lo, hi = t["accuracy_ci95"]
    return f"{t['accuracy']:.0%} ({t['correct']}/{t['questions']}; {lo:.0%}-{hi:.0%})"


def table_markdown(results: dict) -> str:
    streams = results["streams"]
    protocol = "independent (each question asked of the stream as ingested)" if results["independent"] else \
        "sequential (each Q/A joins the stream)"
    lines = [
        f"Model `{results['model']}` ({results['weights']} weights); protocol: {protocol}. Streams: "
        + "; ".join(f"`{s['name']}` {'+'.join(s['clips'])}, {s['frames']} frames, needle set {s['needle_set']}, "
                    f"{s['tokens']} tokens ({s['past_tokens']} past){' [hidden]' if s['hidden'] else ''}" for s in streams)
        + ". Accuracy with its 95 % Wilson interval; _hidden_: the streams nothing was tuned on. "
        "`oracle`: exact top-B by true attention; `near-needle`: full within 1 s of the needle.\n",
    ]
    pooled = results["pooled"]
    kinds = sorted({k for m in pooled.values() for b in m.values() for k in b["by_kind"]})
    names = [s["name"] for s in streams]
    lines.append("| method | budget | all | hidden | " + " | ".join(kinds) + " | " + " | ".join(names) + " |")
    lines.append("|---|---|---|---|" + "---|" * (len(kinds) + len(names)))
    for method, budgets in pooled.items():
        for b, t in budgets.items():
            budget = "all" if b == "all" else f"{float(b):.0%}"
            by_kind = [f"{t['by_kind'][k]['correct']}/{t['by_kind'][k]['questions']}" if k in t["by_kind"] else "-"
                       for k in kinds]
            by_stream = [f"{t['by_stream'][n]['correct']}/{t['by_stream'][n]['questions']}" for n in names]
            lines.append(f"| {method} | {budget} | {_cell(t)} | {_cell(t['hidden'])} | " + " | ".join(by_kind)
                         + " | " + " | ".join(by_stream) + " |")
    if results["goal"]:
        lines.append("\nGoal (issue 19): cluster within 2 points of full at 10 % and never below token.\n")
        lines.append("| budget | cluster | token | full | cluster vs token: only cluster / only token, p | "
                     "cluster vs full: only cluster / only full, p | verdict |")
        lines.append("|---|---|---|---|---|---|---|")
        for b, g in results["goal"].items():
            vt, vf = g["vs_token"], g["vs_full"]
            verdict = ("ok" if g["not_below_token"] else "below token") + (
                "" if "within_2pt_of_full" not in g else (", within 2 points of full" if g["within_2pt_of_full"]
                                                          else ", MISS vs full"))
            lines.append(f"| {float(b):.0%} | {g['cluster']:.0%} | {g['token']:.0%} | {g['full']:.0%} | "
                         f"{vt['only_cluster']} / {vt['only_token']}, {vt['p_mcnemar']:.3f} | "
                         f"{vf['only_cluster']} / {vf['only_full']}, {vf['p_mcnemar']:.3f} | {verdict} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [float(b) * 100 for b in results["budgets"]]
    for method, budgets in results["pooled"].items():
        if "all" in budgets:
            t = budgets["all"]
            style = {"full": ("k", ":")}.get(method, ("grey", "-."))
            ax.axhline(t["accuracy"], color=style[0], ls=style[1], label=f"{method} (no budget)")
            continue
        acc = [budgets[b]["accuracy"] for b in results["budgets"]]
        lo = [a - budgets[b]["accuracy_ci95"][0] for a, b in zip(acc, results["budgets"])]
        hi = [budgets[b]["accuracy_ci95"][1] - a for a, b in zip(acc, results["budgets"])]
        ax.errorbar(xs, acc, yerr=[lo, hi], marker="o", capsize=3, label=method)
    n = next(iter(next(iter(results["pooled"].values())).values()))["questions"]
    ax.set_xlabel("budget, % of the past")
    ax.set_ylabel(f"accuracy over {n} questions (95 % CI)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"needle suite, {results['model']} ({results['weights']}), "
                 f"{'independent' if results['independent'] else 'sequential'}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
