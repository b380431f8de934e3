"""Plots of a ``benchmarks/run.py`` JSON (matplotlib, Agg backend).

    python -m benchmarks.plot RESULTS.json [MORE.json ...] [--out RESULTS.png]

Several JSON files (e.g. one GPU call for decode, another for prefill) are drawn together: each
panel takes its rows, and the ceilings it draws, from the files that hold rows for it.

One PNG, two panels:
(a) prefill TFLOP/s against sequence length (one causal prompt, paged for our backends,
    contiguous for the peers), one line per backend/peer, the measured matmul ceiling as a
    horizontal line;
(b) decode effective TB/s per backend/peer for each decode shape, bars, with the measured copy
    ceilings as horizontal lines.
Only rows with status ``ok`` are drawn (``invalid`` rows, whose results were wrong, are not).

:func:`render_zoo` draws a ``benchmarks/zoo.py`` JSON (its ``zoo_summary``): (a) decode, each
backend's fraction of the copy ceiling per layer and batch point, through ``paged_decode``
(plain) and ``paged_attention`` given the same decode-only batch (hatched); (b) prefill, each
backend's ratio to cuDNN on contiguous KV (to the first peer measured where there is no cuDNN);
(c) serving steps, each backend's one-call time over the best two-call split (below 1 is good).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _ok(r):
    return r.get("status") == "ok" and r.get("value") is not None


def _is_prefill_row(r):
    return (
        _ok(r)
        and r.get("is_prefill")
        and r.get("metric") == "TFLOP/s"
        and r.get("group") in ("prefill", "sweep")
    )


def _is_decode_row(r):
    return _ok(r) and r.get("group") == "decode" and r.get("metric") == "TB/s"


def _panel(docs, pred):
    """Rows matching ``pred`` from all docs, and the ceilings of the first doc that has any."""
    rows, ceil = [], {}
    for d in docs:
        mine = [r for r in d.get("rows", []) if pred(r)]
        if mine and not ceil:
            ceil = d.get("ceilings", {})
        rows += mine
    return rows, ceil


def render(json_path, png_path: str | None = None) -> str:
    paths = [json_path] if isinstance(json_path, str) else list(json_path)
    docs = []
    for p in paths:
        with open(p) as f:
            docs.append(json.load(f))
    doc = docs[0]
    png_path = png_path or os.path.splitext(paths[0])[0] + ".png"

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5.5))
    title = f"{doc.get('device', '?')}  jax {doc.get('jax_version', '?')}  {doc.get('date', '')}"
    fig.suptitle(title, fontsize=10)

    # (a) prefill sweep
    series = defaultdict(dict)
    rows, ceil = _panel(docs, _is_prefill_row)
    for r in rows:
        series[(r["kind"], r["impl"])][r["seq_len"]] = r["value"]
    for (kind, impl), pts in sorted(series.items()):
        xs = sorted(pts)
        ax1.plot(
            xs,
            [pts[x] for x in xs],
            marker="o",
            linestyle="-" if kind == "ours" else "--",
            linewidth=2.2 if kind == "ours" else 1.2,
            label=f"{impl}" + ("" if kind == "ours" else " (peer)"),
        )
    for name, style in (("torch", ":"), ("xla", "-.")):
        v = ceil.get("matmul", {}).get(name)
        if v:
            ax1.axhline(
                v,
                color="k",
                linestyle=style,
                linewidth=1,
                label=f"bf16 matmul ceiling, {name}: {v:.3g}",
            )
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("sequence length (one causal prompt)")
    ax1.set_ylabel("TFLOP/s  (4 * visible q.k pairs * D * H / time)")
    ax1.set_title("(a) prefill")
    ax1.grid(True, alpha=0.3)
    if series:
        ax1.legend(fontsize=7)
    else:
        ax1.text(0.5, 0.5, "no prefill rows", ha="center", transform=ax1.transAxes)

    # (b) decode bars
    shapes, impls, vals = [], [], {}
    rows, ceil = _panel(docs, _is_decode_row)
    for r in rows:
        if r["shape"] not in shapes:
            shapes.append(r["shape"])
        label = r["impl"] + ("" if r["kind"] == "ours" else " (peer)")
        if label not in impls:
            impls.append(label)
        vals[(r["shape"], label)] = r["value"]
    if shapes:
        width = 0.8 / max(1, len(impls))
        for j, label in enumerate(impls):
            xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(shapes))]
            ys = [vals.get((s, label), 0.0) for s in shapes]
            bars = ax2.bar(xs, ys, width, label=label, hatch="" if "(peer)" in label else "//")
            for b, y in zip(bars, ys):
                if y:
                    ax2.text(
                        b.get_x() + b.get_width() / 2,
                        y,
                        f"{y:.3g}",
                        ha="center",
                        va="bottom",
                        fontsize=6,
                    )
        ax2.set_xticks(range(len(shapes)))
        ax2.set_xticklabels(shapes)
        ax2.legend(fontsize=7)
    else:
        ax2.text(0.5, 0.5, "no decode rows", ha="center", transform=ax2.transAxes)
    for name, style in (("torch", ":"), ("xla", "-.")):
        v = ceil.get("copy", {}).get(name)
        if v:
            ax2.axhline(
                v, color="k", linestyle=style, linewidth=1, label=f"copy ceiling, {name}: {v:.3g}"
            )
    if ceil.get("copy"):
        ax2.legend(fontsize=7)
    ax2.set_ylabel("effective TB/s  (K and V of every context token once / time)")
    ax2.set_title("(b) paged decode")
    ax2.grid(True, axis="y", alpha=0.3)

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def _bars(ax, cats, series, *, colors=None, hatches=None, fmt="{:.3g}"):
    """Grouped bars: ``series`` maps a label to ``{category: value}``; a log scale when the
    values span more than 20x."""
    labels = [lab for lab, pts in series.items() if pts]
    width = 0.8 / max(1, len(labels))
    vals = [v for lab in labels for v in series[lab].values() if v and v > 0]
    log = bool(vals) and max(vals) / min(vals) > 20
    for j, label in enumerate(labels):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(cats))]
        ys = [series[label].get(c) or 0.0 for c in cats]
        bars = ax.bar(
            xs,
            ys,
            width,
            label=label,
            color=(colors or {}).get(label),
            hatch=(hatches or {}).get(label, ""),
            edgecolor="white",
        )
        for b, y in zip(bars, ys):
            if y:
                ax.text(
                    b.get_x() + b.get_width() / 2, y, fmt.format(y), ha="center", va="bottom",
                    fontsize=5, rotation=90,
                )  # fmt: skip
    if log:
        ax.set_yscale("log")
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats, rotation=45, ha="right", fontsize=6)
    ax.grid(True, axis="y", alpha=0.3)
    if labels:
        ax.legend(fontsize=6, ncol=2)


def render_zoo(json_path: str, png_path: str | None = None) -> str:
    """The zoo's figure (see the module doc) from a ``benchmarks/zoo.py`` JSON."""
    with open(json_path) as f:
        doc = json.load(f)
    png_path = png_path or os.path.splitext(json_path)[0] + ".png"
    summary = doc.get("zoo_summary", [])
    backends = doc.get("zoo_backends") or sorted(
        {b for s in summary for b in s.get("status", {}) if b not in ("-", "setup")}
    )

    color = {b: f"C{i}" for i, b in enumerate(backends)}

    def cat(s):
        return f"{s['layer']} {s['point']}" + (
            "" if s["block_size"] == 16 else f" b{s['block_size']}"
        )

    fig, axes = plt.subplots(3, 1, figsize=(16, 15))
    copy = doc.get("ceilings", {}).get("copy", {})
    fig.suptitle(
        f"model zoo: {doc.get('device', '?')}  jax {doc.get('jax_version', '?')}  "
        f"{doc.get('date', '')}  copy ceiling {copy.get('best', float('nan')):.3g} TB/s",
        fontsize=10,
    )

    # (a) decode: fraction of the copy ceiling
    ax, cats, series, hatches, colors = axes[0], [], {}, {}, {}
    for s in summary:
        if s["group"] not in ("decode", "decode_pa"):
            continue
        c = cat(s)
        if c not in cats:
            cats.append(c)
        for b in backends:
            v = (s.get("frac_of_ceiling") or {}).get(b)
            label = f"{b} ({'paged_decode' if s['group'] == 'decode' else 'paged_attention'})"
            hatches[label] = "" if s["group"] == "decode" else "//"
            colors[label] = color.get(b)
            if v is not None:
                series.setdefault(label, {})[c] = v
    _bars(ax, cats, series, colors=colors, hatches=hatches)
    ax.axhline(0.95, color="k", linestyle=":", linewidth=1, label="goal 0.95")
    ax.set_ylabel("fraction of the copy ceiling")
    ax.set_title("(a) decode: K+V of visible keys / time, over the copy ceiling (hatched: "
                 "paged_attention given the decode-only batch)", fontsize=9)  # fmt: skip

    # (b) prefill: ratio to the peer
    ax, cats, series, peer = axes[1], [], {}, set()
    for s in summary:
        if s["group"] != "prefill" or not s.get("x_peer"):
            continue
        c = cat(s)
        cats.append(c)
        peer.add(s.get("x_peer_name"))
        for b in backends:
            if s["x_peer"].get(b) is not None:
                series.setdefault(b, {})[c] = s["x_peer"][b]
    _bars(ax, cats, series, colors=color)
    ax.axhline(1.0, color="k", linestyle=":", linewidth=1)
    ax.set_ylabel(f"TFLOP/s over {'/'.join(sorted(p for p in peer if p)) or 'peer'}")
    ax.set_title("(b) causal prefill, paged, over the peer on contiguous KV (same visible-pair "
                 "FLOPs)", fontsize=9)  # fmt: skip
    if not cats:
        ax.text(0.5, 0.5, "no prefill rows with a peer", ha="center", transform=ax.transAxes)

    # (c) serving: one call / split
    ax, cats, series = axes[2], [], {}
    for s in summary:
        if s["group"] != "serving" or not s.get("one_vs_split_by_backend"):
            continue
        c = cat(s)
        cats.append(c)
        for b, v in s["one_vs_split_by_backend"].items():
            series.setdefault(b, {})[c] = v
    _bars(ax, cats, series, colors=color)
    ax.axhline(1.0, color="k", linestyle=":", linewidth=1)
    ax.set_ylabel("one-call time / best split time")
    ax.set_title("(c) serving step: chunk + decode rows in one paged_attention call, over the "
                 "best paged_attention + paged_decode split (< 1: one call wins)", fontsize=9)  # fmt: skip
    if not cats:
        ax.text(0.5, 0.5, "no serving rows", ha="center", transform=ax.transAxes)

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.plot")
    ap.add_argument("json", nargs="+")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    with open(a.json[0]) as f:
        zoo = "zoo_summary" in json.load(f)
    print(render_zoo(a.json[0], a.out) if zoo else render(a.json, a.out))


if __name__ == "__main__":
    main()
