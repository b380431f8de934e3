"""Plot of the MoE rows of a ``benchmarks/run.py`` JSON (``--only moe_zoo``), matplotlib Agg.

    python -m benchmarks.moe_plot RESULTS.json OUT.png

One panel per token count (4096, 512, 64 in the zoo), one group of bars per model, one bar per
implementation: our backends (``xla``, ``triton``, ``mosaic``) and the peers' whole-layer rows
(``mgpu_ragged_dot``, ``lax_ragged_dot``: the sum of their two GEMMs' times). Prefill-shaped
panels show TFLOP/s with the measured matmul ceiling as a line, decode-shaped ones TB/s of the
expert weights touched with the copy ceiling. A row that did not run ``ok`` has no bar; a short
mark at the base says why (``oom``, ``err``, ``n/i``: not implemented, ``skip``, ``bad``: a
wrong result).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

IMPLS = ("xla", "triton", "mosaic", "mgpu_ragged_dot", "lax_ragged_dot")
COLORS = {
    "xla": "#4c72b0",
    "triton": "#dd8452",
    "mosaic": "#55a868",
    "mgpu_ragged_dot": "#8172b3",
    "lax_ragged_dot": "#937860",
}


def _is_moe(r) -> bool:
    params = r.get("shape_params") or {}
    return r.get("group") in ("moe", "moe_zoo") and params.get("type") == "MoEShape"


def _mark(r) -> str:
    """Why a row has no bar, in a few letters."""
    status, err = r.get("status"), (r.get("error") or "").lower()
    if status == "invalid":
        return "bad"
    if status == "not_implemented":
        return "n/i"
    if status == "skipped":
        return "skip"
    if "resource_exhausted" in err or "out of memory" in err:
        return "oom"
    return "err"


def collect(doc: dict) -> dict:
    """{num_tokens: {"metric": str, "models": [label], "cells": {(label, impl): row}}} of the
    MoE rows of one results document (the impls of :data:`IMPLS` only)."""
    panels: dict = defaultdict(lambda: {"metric": None, "models": [], "cells": {}})
    for r in doc.get("rows", []):
        if not _is_moe(r) or r.get("impl") not in IMPLS:
            continue
        p = r["shape_params"]
        panel = panels[p["num_tokens"]]
        label = p.get("label") or r["shape"]
        if label not in panel["models"]:
            panel["models"].append(label)
        panel["metric"] = panel["metric"] or r.get("metric")
        panel["cells"][(label, r["impl"])] = r
    return dict(panels)


def render(json_path: str, png_path: str) -> str:
    with open(json_path) as f:
        doc = json.load(f)
    panels = collect(doc)
    if not panels:
        raise ValueError(f"{json_path} has no MoE rows")
    ceilings = doc.get("ceilings", {})
    tokens = sorted(panels, reverse=True)
    fig, axes = plt.subplots(len(tokens), 1, figsize=(13, 4.2 * len(tokens)), squeeze=False)
    for ax, t in zip(axes[:, 0], tokens):
        panel = panels[t]
        metric = panel["metric"] or "TFLOP/s"
        impls = [i for i in IMPLS if any(k[1] == i for k in panel["cells"])]
        width = 0.8 / max(1, len(impls))
        top = 0.0
        for j, impl in enumerate(impls):
            for m, label in enumerate(panel["models"]):
                r = panel["cells"].get((label, impl))
                if r is None:
                    continue
                xpos = m - 0.4 + (j + 0.5) * width
                if r.get("status") == "ok" and r.get("value") is not None:
                    ax.bar(xpos, r["value"], width, color=COLORS[impl])
                    top = max(top, r["value"])
                else:
                    ax.text(xpos, 0, _mark(r), rotation=90, ha="center", va="bottom", fontsize=7)
            ax.bar(0, 0, 0, color=COLORS[impl], label=impl)  # legend entry even with no bar
        kind = "copy" if metric == "TB/s" else "matmul"
        ceil = ceilings.get(kind, {}).get("best")
        if ceil:
            ax.axhline(ceil, color="k", ls="--", lw=1)
            ax.text(len(panel["models"]) - 0.5, ceil, f"{kind} ceiling {ceil:.3g} {metric}",
                    ha="right", va="bottom", fontsize=8)  # fmt: skip
            top = max(top, ceil)
        ax.set_ylim(0, 1.3 * top if top else 1)
        ax.set_xlim(-0.5, len(panel["models"]) - 0.5)
        ax.set_xticks(range(len(panel["models"])))
        ax.set_xticklabels(panel["models"], fontsize=9)
        what = "TB/s of expert weights touched" if metric == "TB/s" else "TFLOP/s"
        ax.set_ylabel(what)
        ax.set_title(f"fused MoE, {t} tokens ({doc.get('device', '')})", fontsize=10)
        handles, labels = ax.get_legend_handles_labels()
        seen = dict(zip(labels, handles))
        ax.legend(seen.values(), seen.keys(), fontsize=8, ncol=len(seen), loc="upper left")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.moe_plot", description=__doc__)
    ap.add_argument("json")
    ap.add_argument("png")
    a = ap.parse_args(argv)
    print(render(a.json, a.png))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
