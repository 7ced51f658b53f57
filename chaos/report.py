"""The chaos report's readable forms: a table for the terminal, a PNG of the loss curve with the failures."""

from __future__ import annotations

import json
import os


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:.1f}{unit}" if isinstance(v, float) else f"{v}{unit}"


def table(report: dict) -> str:
    rows = [("#", "fault", "step", "t", "detected by", "restored", "lost", "recovery", "re-protected", "outcome")]
    for f in report["faults"]:
        detected = "; ".join(f["detected_by"]) or "-"
        if len(detected) > 70:
            detected = detected[:67] + "..."
        rows.append((str(f["index"]), f["label"], _fmt(f["step"]), _fmt(f["t"], " s"), detected,
                     _fmt(f["restored_step"]), _fmt(f["steps_lost"]), _fmt(f["recovery_s"], " s"),
                     _fmt(f.get("reprotected_s"), " s"), f["outcome"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    s = report["scenario"]["cluster"]
    lines.append("")
    lines.append(f"scenario {report['scenario']['name']}: {s['nodes']} nodes x {s['ranks_per_node']} ranks, m={s['m']},"
                 f" {s['steps']} steps; {len(report['faults'])} faults, {report['restarts']} restarts,"
                 f" {report['steps_retrained']} rank-steps trained twice, {report['duration_s']:.0f} s")
    p = report["proxy"]
    lines.append(f"peer proxy: {p['forwarded']} messages forwarded, {p['dropped']} dropped, {p['delayed']} delayed,"
                 f" {p['duplicated']} duplicated")
    if report["expected_failure"]:
        lines.append("final state: not compared (the scenario ends in an unrecoverable fault); every logged loss"
                     " compared with the reference")
    else:
        lines.append("final state: model and optimizer state of every rank compared byte for byte with the reference;"
                     " every logged loss of every attempt compared")
    for problem in report["problems"][:20]:
        lines.append(f"  problem: {problem}")
    verdict = report["verdict"]
    why = ("nothing was lost" if verdict == "PASS" and not report["expected_failure"] else
           "the unrecoverable fault ended in the expected clear error, nothing wrong was trained"
           if verdict == "PASS" else f"{len(report['problems'])} problem(s)")
    lines.append(f"VERDICT: {verdict} ({why})")
    return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1, sort_keys=False)


def plot(report: dict, path: str) -> str | None:
    """Loss per step (reference and every attempt) with the faults marked, and steps over wall time with
    the recovery times. Returns the path, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax, tx) = plt.subplots(2, 1, figsize=(11, 8), gridspec_kw={"height_ratios": [3, 2]})
    ref = report["losses"]["reference"]
    if ref:
        ax.plot([s for s, _ in ref], [v for _, v in ref], color="black", lw=3, alpha=0.25, label="reference (no faults)")
    runs = report["losses"]["run"]
    colors = plt.get_cmap("tab10")
    for i, (a, pts) in enumerate(runs.items()):
        ax.plot([s for s, _, _ in pts], [v for _, v, _ in pts], ".-", ms=3, lw=1, color=colors(i % 10), label=f"attempt {a}")
    t0 = min((t for pts in runs.values() for _, _, t in pts), default=0.0)
    for i, (a, pts) in enumerate(runs.items()):
        tx.plot([t - t0 for _, _, t in pts], [s for s, _, _ in pts], ".", ms=3, color=colors(i % 10))
    for f in report["faults"]:
        if f["step"] is None:
            continue
        color = "tab:red" if not f["ok"] else ("tab:orange" if f["restarted"] else "tab:gray")
        ax.axvline(f["step"] + 0.5, color=color, ls="--", lw=0.8)
        rec = f" {f['recovery_s']:.0f}s" if f["recovery_s"] is not None else ""
        ax.annotate(f"#{f['index']} {f['kind']}{rec}", (f["step"] + 0.5, 1.0), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize=7, color=color)
        if f["wall"] is not None:
            x = f["wall"] - t0
            tx.axvline(x, color=color, ls="--", lw=0.8)
            if f["recovery_s"] is not None:
                tx.axvspan(x, x + f["recovery_s"], color=color, alpha=0.12)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over ranks)")
    ax.set_title(f"snapguard chaos: {report['scenario']['name']} - {report['verdict']}"
                 f" ({len(report['faults'])} faults, {report['restarts']} restarts)")
    ax.legend(fontsize=7, ncol=4, loc="lower left")
    tx.set_xlabel("wall time (s); shaded: from the fault to the first step of the attempt that trained on")
    tx.set_ylabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_all(report: dict, out_dir: str) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "report.json"), "png": os.path.join(out_dir, "loss.png")}
    write_json(report, paths["json"])
    if plot(report, paths["png"]) is None:
        paths.pop("png")
    return paths
