"""Figures and the HTML page of an eval sweep, drawn from its long-format rows.

- ``plots/vs_checkpoint.png``: each metric against the checkpoint step, one line per
  guidance scale (at the sweep's largest step count and first sampler);
- ``plots/heatmap_cfg_steps.png``: guidance x steps for the newest checkpoint;
- ``plots/quality_vs_adherence.png``: flicker and FD against oracle accuracy, one point
  per (checkpoint, cfg, steps, sampler) group;
- ``index.html``: the summary table per group, the plots, and the sample clips
  (``<video controls>``) beside their prompts and scores.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from vdiff.eval.report import ATTRS

# Metrics drawn against the checkpoint step (those present in the rows).
CURVES = ("oracle_acc", "sync_f1", "flicker", "fd_vae_features", "flow_loss_val")
HEATMAPS = ("oracle_acc", "sync_f1", "flicker", "fd_vae_features")
NOTES = {
    "fvd": "not computed: FVD needs an I3D network trained on Kinetics, which vdiff does not "
    "ship or load in this version (the fvd row is null).",
    "fd_vae_features": "Fréchet distance between val clips and the generated clips of a "
    "(checkpoint, cfg, steps, sampler) group on pooled features of vdiff's own video VAE "
    "encoder (per-channel mean, std and latent-frame change); not FVD, only comparable "
    "between runs that share this VAE, and noisy with few clips.",
    "flicker": "(255 - mean |frame[t+1] - frame[t]|) / 255 over pixels and channels: 1 = static.",
    "seconds": "wall time per clip of generation (sampling + decoding; a batch's time over "
    "its clips); a batch with a new shape also pays for compilation.",
    "nfe": "transformer evaluations per clip (Euler: steps; Heun: 2 steps - 1; x2 with "
    "guidance, cfg != 1).",
    "flow_loss_val": "held-out flow-matching loss of each checkpoint on the val latents at "
    "8 fixed noise levels with fixed noise draws (the same inputs for every checkpoint).",
}
LABELS = {
    "oracle_acc": "oracle accuracy (mean of 4 attributes)",
    "fd_vae_features": "FD on vdiff VAE features (lower is better)",
    "flow_loss_val": "held-out flow loss (fixed grid)",
    "flicker": "temporal flicker score (1 = static)",
    "sync_f1": "audio-video sync F1",
}


def _mean(values) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def group_means(rows: list[dict]) -> dict[tuple, dict[str, float]]:
    """Per (checkpoint, cfg, steps, sampler): each metric's mean over prompts and seeds,
    with ``oracle_acc`` (mean of the oracle attributes), ``n`` (clips), ``nfe`` and
    ``seconds`` (mean per clip); per-checkpoint metrics (held-out loss) are copied in."""
    cell_rows: dict[tuple, dict[str, list]] = {}
    per_ckpt: dict[int, dict[str, float]] = {}
    for r in rows:
        if r["prompt"] is not None:
            g = cell_rows.setdefault((r["checkpoint"], r["cfg"], r["steps"], r["sampler"]), {})
            g.setdefault(r["metric"], []).append(r["value"])
            if r["metric"] == "flicker":
                g.setdefault("seconds", []).append(r["seconds"])
                g["nfe"] = [r["nfe"]]  # the same for every clip of a group
        elif r["checkpoint"] is not None and r["cfg"] is None:
            per_ckpt.setdefault(r["checkpoint"], {})[r["metric"]] = r["value"]
    out = {}
    for g, metrics in cell_rows.items():
        m = {k: _mean(v) for k, v in metrics.items()}
        m["n"] = len(metrics.get("flicker", []))
        if metrics.get("nfe", [None])[0] is not None:
            m["nfe"] = int(metrics["nfe"][0])
        if any(a in m for a in ATTRS):
            m["oracle_acc"] = _mean([m[a] for a in ATTRS if a in m])
        m.update({k: v for k, v in per_ckpt.get(g[0], {}).items() if v is not None})
        out[g] = m
    for r in rows:  # group-level rows (Fréchet distance)
        g = (r["checkpoint"], r["cfg"], r["steps"], r["sampler"])
        if r["prompt"] is None and r["cfg"] is not None and g in out:
            out[g][r["metric"]] = float("nan") if r["value"] is None else r["value"]
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """Writes the sweep's PNG figures into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = group_means(rows)
    if not groups:
        return []
    plt = _plt()
    paths = []
    ckpts = sorted({g[0] for g in groups})
    cfgs = sorted({g[1] for g in groups})
    steps = sorted({g[2] for g in groups})
    sampler = sorted({g[3] for g in groups})[0]
    present = lambda names: [m for m in names if any(m in v for v in groups.values())]  # noqa: E731

    curves = present(CURVES)
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], curves):
        for cfg in cfgs:
            ys = [groups.get((ck, cfg, steps[-1], sampler), {}).get(metric, np.nan) for ck in ckpts]
            ax.plot(ckpts, ys, marker="o", label=f"cfg {cfg:g}")
        ax.set(xlabel="checkpoint step", xticks=ckpts)
        ax.set_title(LABELS.get(metric, metric), fontsize=8)
        ax.ticklabel_format(axis="y", useOffset=False)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"metrics vs checkpoint ({steps[-1]} steps, {sampler})", fontsize=9)
    paths.append(_save(plt, fig, out_dir / "vs_checkpoint.png"))

    heat = present(HEATMAPS)
    fig, axes = plt.subplots(1, len(heat), figsize=(3.8 * len(heat), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], heat):
        grid = np.array(
            [
                [groups.get((ckpts[-1], c, s, sampler), {}).get(metric, np.nan) for s in steps]
                for c in cfgs
            ]
        )
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            label = "-" if np.isnan(v) else f"{v:.3g}"
            box = dict(facecolor="white", alpha=0.7, edgecolor="none", pad=1)
            ax.text(j, i, label, ha="center", va="center", fontsize=7, bbox=box)
        ax.set(
            xticks=range(len(steps)), xticklabels=steps, yticks=range(len(cfgs)),
            yticklabels=[f"{c:g}" for c in cfgs], xlabel="steps", ylabel="cfg",
        )  # fmt: skip
        ax.set_title(LABELS.get(metric, metric), fontsize=8)
        fig.colorbar(im, ax=ax).formatter.set_useOffset(False)
    fig.suptitle(f"guidance x steps at checkpoint {ckpts[-1]} ({sampler})", fontsize=9)
    paths.append(_save(plt, fig, out_dir / "heatmap_cfg_steps.png"))

    quality = present(("flicker", "fd_vae_features"))
    if "oracle_acc" in present(("oracle_acc",)) and quality:
        fig, axes = plt.subplots(1, len(quality), figsize=(4.4 * len(quality), 3.6), squeeze=False)
        for ax, metric in zip(axes[0], quality):
            for cfg in cfgs:
                pts = [
                    (v["oracle_acc"], v.get(metric, np.nan), g)
                    for g, v in groups.items()
                    if g[1] == cfg
                ]
                ax.scatter(
                    [p[0] for p in pts], [p[1] for p in pts],
                    s=[12 + 10 * steps.index(p[2][2]) for p in pts], label=f"cfg {cfg:g}", alpha=0.8,
                )  # fmt: skip
            ax.set(xlabel="oracle accuracy (adherence)", ylabel=LABELS.get(metric, metric))
            ax.yaxis.label.set_fontsize(8)
            ax.ticklabel_format(useOffset=False)
        axes[0][0].legend(fontsize=7, title="marker size = steps", title_fontsize=7)
        fig.suptitle("quality vs adherence, one point per (checkpoint, cfg, steps)", fontsize=9)
        paths.append(_save(plt, fig, out_dir / "quality_vs_adherence.png"))
    return paths


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))


def write_html(out_dir: Path, rows: list[dict], info: dict, shown: list) -> Path:
    """Writes ``index.html``: notes, summary table, plots, and the clips of ``shown`` cells.

    Args:
        out_dir: the sweep folder (holding ``clips/`` and ``plots/``).
        rows: the merged long-format rows.
        info: the sweep description (``sweep.json``: spec, grid, counts, notes).
        shown: :class:`vdiff.eval.sweep.Cell` s whose clips were saved.
    """
    out_dir = Path(out_dir)
    groups = group_means(rows)
    sweep_level = {r["metric"]: r["value"] for r in rows if r["checkpoint"] is None}
    cols = (
        "n", "oracle_acc", *ATTRS, "sync_f1", "flicker", "fd_vae_features", "flow_loss_val",
        "nfe", "seconds",
    )  # fmt: skip
    present = [c for c in cols if any(c in g for g in groups.values())]
    head = "".join(
        f"<th>{html.escape(c)}</th>" for c in ("checkpoint", "cfg", "steps", "sampler", *present)
    )
    body = "".join(
        "<tr>"
        + f"<td>{g[0]}</td><td>{g[1]:g}</td><td>{g[2]}</td><td>{html.escape(g[3])}</td>"
        + "".join(f"<td>{_fmt(m.get(c))}</td>" for c in present)
        + "</tr>"
        for g, m in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3]))
    )
    scores: dict[tuple, dict] = {}
    for r in rows:
        if r["prompt"] is not None:
            key = (r["checkpoint"], r["cfg"], r["steps"], r["sampler"], r["prompt"], r["seed"])
            scores.setdefault(key, {})[r["metric"]] = r["value"]
    samples = []
    for ck in sorted({c.checkpoint for c in shown}, reverse=True):
        cells = [c for c in shown if c.checkpoint == ck]
        figs = []
        for c in sorted(cells, key=lambda c: (c.prompt_index, c.cfg, c.steps, c.sampler)):
            s = scores.get(c.key, {})
            acc = [s[a] for a in ATTRS if s.get(a) is not None]
            line = f"cfg {c.cfg:g}, {c.steps} steps {c.sampler}, seed {c.seed}<br>"
            line += f"oracle {_fmt(float(np.mean(acc)) if acc else None)} "
            line += f"flicker {_fmt(s.get('flicker'))} sync F1 {_fmt(s.get('sync_f1'))}"
            figs.append(
                f'<figure><video src="clips/{html.escape(c.clip_name)}.mp4" controls loop muted '
                f'width="160"></video><figcaption><i>{html.escape(c.prompt)}</i><br>{line}'
                "</figcaption></figure>"
            )
        open_ = " open" if not samples else ""
        samples.append(
            f"<details{open_}><summary>checkpoint {ck}</summary>{''.join(figs)}</details>"
        )
    plots = "".join(
        f'<p><img src="plots/{p.name}"></p>' for p in sorted((out_dir / "plots").glob("*.png"))
    )
    notes = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in NOTES.items())
    grid = ", ".join(
        f"{k} {html.escape(str(info[k]))}"
        for k in ("checkpoints", "cfg", "steps", "sampler", "seeds")
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>vdiff eval sweep</title>
<style>body{{font-family:sans-serif;margin:2em}} figure{{display:inline-block;margin:6px;vertical-align:top;width:200px;font-size:12px}}
video{{image-rendering:pixelated}} td,th{{padding:2px 8px;text-align:right}} table{{border-collapse:collapse}} tr:nth-child(even){{background:#f3f3f3}}</style></head>
<body><h1>vdiff eval sweep: {html.escape(info["spec"]["name"])}</h1>
<p>Grid: {grid}, {len(info["prompts"])} prompts; {info["cells"]} cells ({info["cells_computed"]} computed in the last run, {info["seconds"]:.1f} s).
Table: <a href="results.csv">results.csv</a>, <a href="results.jsonl">results.jsonl</a>.</p>
<p>VAE on val clips (not swept): PSNR {_fmt(sweep_level.get("vae_psnr"))} dB, SSIM {_fmt(sweep_level.get("vae_ssim"))}.
FVD: {"not computed" if sweep_level.get("fvd") is None else _fmt(sweep_level.get("fvd"))}.</p>
<ul>{notes}</ul>
<h2>Summary (mean over prompts and seeds)</h2><table><tr>{head}</tr>{body}</table>
<h2>Plots</h2>{plots}<h2>Samples</h2>{"".join(samples)}</body></html>"""
    path = out_dir / "index.html"
    path.write_text(page)
    return path
