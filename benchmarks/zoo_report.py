"""The model zoo's summary and table: per (case, group) each implementation's figure, the best
backend, ``auto``'s ratio to it, and the one-call / split ratio of serving steps
(``benchmarks/zoo.py`` runs the cases)."""

from __future__ import annotations


def best_of(rows: dict):
    """(backend, row) of the fastest valid row among the backends (``auto`` excluded)."""
    ok = {b: r for b, r in rows.items() if b != "auto" and r["status"] == "ok"}
    return min(ok.items(), key=lambda kv: kv[1]["time_s"]) if ok else (None, None)


def summarize(rows, backends) -> list[dict]:
    """One entry per (case, group): each implementation's figure, the best backend, auto's
    time over the best's, and the group's own ratio (copy fraction, x cuDNN, one/split...)."""
    by: dict[tuple, list] = {}
    for r in rows:
        if "case" in r:
            by.setdefault((r["case"], r["group"]), []).append(r)
    times = {}
    for (case, group), rs in by.items():
        ok = {r["impl"]: r for r in rs if r["status"] == "ok" and r["kind"] == "ours"}
        b, br = best_of(ok)
        if br is not None:
            times[(case, group)] = br["time_s"]
    out = []
    for (case, group), rs in by.items():
        r0 = rs[0]
        s = {k: r0.get(k) for k in ("case", "model", "layer", "layer_config", "entry", "point")}
        s.update(group=group, block_size=r0.get("block_size"), metric=r0.get("metric"))
        s["status"] = {r["impl"]: r["status"] for r in rs}
        s["ours"] = [r["impl"] for r in rs if r["kind"] == "ours" and r["impl"] != "setup"]
        s["value"] = {r["impl"]: r["value"] for r in rs if r["status"] in ("ok", "invalid")}
        s["frac_of_ceiling"] = {
            r["impl"]: r.get("frac_of_ceiling") for r in rs if r["status"] == "ok"
        }
        s["errors"] = {r["impl"]: r["error"] for r in rs if r.get("error")}
        ours_ok = {r["impl"]: r for r in rs if r["kind"] == "ours" and r["status"] == "ok"}
        best, br = best_of(ours_ok)
        s["best"], s["best_value"] = best, br and br["value"]
        auto = ours_ok.get("auto")
        s["auto_vs_best"] = auto["time_s"] / br["time_s"] if (auto and br) else None
        s["auto_within_3pct"] = None if s["auto_vs_best"] is None else s["auto_vs_best"] <= 1.03
        for r in rs:
            if r["impl"] == "auto":
                r["auto_vs_best"], r["best_backend"] = s["auto_vs_best"], best
        if br is not None:
            s["best_frac_of_ceiling"] = br.get("frac_of_ceiling")
            peer_ok = {r["impl"]: r for r in rs if r["kind"] == "peer" and r["status"] == "ok"}
            for p, pr in peer_ok.items():
                s[f"x_{p}"] = br["value"] / pr["value"]
            if peer_ok:  # each backend over the first peer measured (cudnn first)
                pr = min(peer_ok.values(), key=_peer_order)
                s["x_peer_name"] = pr["impl"]
                s["x_peer"] = {b: r["value"] / pr["value"] for b, r in ours_ok.items()}
            split = next((r for r in rs if r["kind"] == "split" and r["status"] == "ok"), None)
            if split:
                s["split"] = split["impl"]
                s["one_vs_split"] = br["time_s"] / split["time_s"]
                s["one_vs_split_by_backend"] = {
                    b: r["time_s"] / split["time_s"] for b, r in ours_ok.items()
                }
                parts = [times.get((case, g)) for g in ("serving_chunk", "serving_decode")]
                if all(parts):
                    s["one_vs_sum_of_parts"] = br["time_s"] / sum(parts)
            if group == "decode_pa" and times.get((case, "decode")):
                s["pa_speed_vs_decode"] = times[(case, "decode")] / br["time_s"]
        out.append(s)
    return out


def _peer_order(r):
    order = ("cudnn", "torch_sdpa", "xla_dpa")
    return order.index(r["impl"]) if r["impl"] in order else len(order)


def _cell(s, impl):
    st = s["status"].get(impl)
    if st is None:
        return ""
    if st in ("ok", "invalid"):
        v = f"{s['value'][impl]:.3g}"
        return v if st == "ok" else v + "!INV"
    return {"not_implemented": "n/i", "skipped": "skip"}.get(st, st)


def figure(s) -> str:
    parts = []
    fc = s.get("best_frac_of_ceiling")
    if fc is not None:
        parts.append(f"{100 * fc:.1f}% {'copy' if s['metric'] == 'TB/s' else 'matmul'}")
    if s.get("pa_speed_vs_decode") is not None:
        parts.append(f"{s['pa_speed_vs_decode']:.2f}x decode speed")
    for p in ("cudnn", "torch_sdpa", "xla_dpa"):
        if s.get(f"x_{p}") is not None:
            parts.append(f"{s[f'x_{p}']:.2f}x {p}")
    if s.get("one_vs_split") is not None:
        parts.append(f"one/split {s['one_vs_split']:.2f} ({s['split']})")
    return ", ".join(parts)


def table(summary, backends) -> str:
    backends = list(backends)  # and any other backend of resumed rows
    backends += sorted({b for s in summary for b in s["ours"]} - set(backends))
    head = ["layer", "entry", "point", "bs", "metric", *backends, "best", "auto/best", "figure"]
    lines = []
    for s in summary:
        avb = s.get("auto_vs_best")
        avb = "" if avb is None else f"{avb:.3f}" + ("" if avb <= 1.03 else " SLOW")
        if list(s["status"]) == ["-"]:  # a case not run
            cells = [""] * len(backends) + ["", "", "skipped: " + (s["errors"].get("-") or "")[:70]]
        else:
            fig = figure(s)
            if s.get("best") is None and s["errors"]:  # nothing ran: say why
                fig = "; ".join(f"{k}: {v}" for k, v in s["errors"].items())[:100]
            cells = [_cell(s, b) for b in backends] + [s.get("best") or "-", avb, fig]
        lines.append(
            [s["layer"], s["group"], s["point"], str(s["block_size"]), s["metric"], *cells]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*["-" * w for w in widths])]
    return "\n".join(out + [fmt.format(*ln) for ln in lines])
