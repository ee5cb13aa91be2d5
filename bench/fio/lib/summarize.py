#!/usr/bin/env python3
"""summarize.py — turn one nbd-bench.sh run directory into summary.md + summary.json.

Input (written by nbd-bench.sh into RUN_DIR):
  results.tsv  one row per (rep, target, workload) sample, header in first line
  targets.tsv  one row per target: name, kind, command, uri, export flags
  meta.tsv     key<TAB>value: machine facts, tool versions, run config, context numbers

Output:
  summary.md   Markdown: machine facts, main table (median and min-max across
               reps), ratio matrix vs. the baseline target, peak RSS per server,
               target table, notes
  summary.json the same numbers, machine readable

Usage: summarize.py RUN_DIR [--baseline NAME]
Only the Python standard library is used.
"""
import csv
import json
import math
import os
import statistics
import sys

# Workload ids in display order, with the metric used for ratios.
# "fio" workloads: primary metric IOPS; "copy" workloads: MB/s.
WORKLOAD_INFO = {
    "randread_4k_qd1": ("fio", "4 KiB random read, QD1"),
    "randread_4k_qd32": ("fio", "4 KiB random read, QD32"),
    "randwrite_4k_qd1": ("fio", "4 KiB random write, QD1"),
    "randwrite_4k_qd32": ("fio", "4 KiB random write, QD32"),
    "read_1m_qd8": ("fio", "1 MiB sequential read, QD8"),
    "write_1m_qd8": ("fio", "1 MiB sequential write, QD8"),
    "randrw70_4k_qd16": ("fio", "4 KiB random 70/30 read/write, QD16"),
    "randrw70_4k_2x16": ("fio", "4 KiB random 70/30 read/write, two connections (multi-conn) at QD16 each: "
                                "fio numjobs=2, one NBD connection per job, group_reporting, so IOPS and MB/s "
                                "are the sum over both connections and the latencies cover both"),
    "copy_in": ("copy", "nbdcopy file -> server (whole disk)"),
    "copy_out": ("copy", "nbdcopy server -> null: (whole disk)"),
}
NUMERIC = ["iops", "mbps", "p50_us", "p99_us", "p999_us", "mean_us", "seconds",
           "srv_cores", "cli_cores", "foreign_cores", "steal_cores", "srv_rss_mib"]


def fnum(s):
    """Parse a TSV cell to float; empty / n/a -> None."""
    if s is None:
        return None
    s = s.strip()
    if s in ("", "n/a", "-", "nan"):
        return None
    try:
        v = float(s)
    except ValueError:
        return None
    return None if math.isnan(v) else v


def stats(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def fmt_num(v, kind):
    """Compact human formatting for table cells."""
    if v is None:
        return "—"
    if kind == "iops":
        return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"
    if kind == "mbps":
        return f"{v:.0f}" if v >= 100 else f"{v:.1f}"
    if kind == "us":
        if v >= 10000:
            return f"{v / 1000:.1f}ms"
        return f"{v:.0f}" if v >= 100 else f"{v:.1f}"
    if kind == "s":
        return f"{v:.2f}"
    if kind == "cores":
        return f"{v:.2f}"
    if kind == "mib":
        return f"{v:.0f}" if v >= 100 else f"{v:.1f}"
    return f"{v:g}"


def cell(st, kind, show_range=True):
    if st is None:
        return "—"
    med = fmt_num(st["median"], kind)
    if not show_range or st["n"] < 2:
        return med
    return f"{med} ({fmt_num(st['min'], kind)}–{fmt_num(st['max'], kind)})"


def read_tsv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    run_dir = sys.argv[1]
    baseline = None
    if "--baseline" in sys.argv:
        baseline = sys.argv[sys.argv.index("--baseline") + 1] or None

    rows = read_tsv(os.path.join(run_dir, "results.tsv"))
    targets = read_tsv(os.path.join(run_dir, "targets.tsv"))
    meta = {}
    with open(os.path.join(run_dir, "meta.tsv")) as f:
        for line in f:
            line = line.rstrip("\n")
            if "\t" in line:
                k, v = line.split("\t", 1)
                meta[k] = v
    noise_thr = float(meta.get("config.noise_cores", "0.3"))

    target_order = [t["name"] for t in targets]
    workload_order = [w for w in WORKLOAD_INFO if any(r["workload"] == w for r in rows)]
    if baseline is None or baseline not in target_order:
        baseline = meta.get("config.baseline") or ""
    if baseline not in target_order:
        baseline = target_order[0] if target_order else ""

    # ---- aggregate ---------------------------------------------------------
    agg = {}  # (workload, target) -> dict
    for w in workload_order:
        for t in target_order:
            samples = [r for r in rows if r["workload"] == w and r["target"] == t]
            ok = [r for r in samples if r["status"] == "ok"]
            entry = {"workload": w, "target": t, "samples": len(samples), "ok": len(ok),
                     "failed": [f"rep{r['rep']}:{r['status']}" for r in samples if r["status"] != "ok"]}
            for k in NUMERIC:
                entry[k] = stats([fnum(r.get(k)) for r in ok])
            # derived: server CPU microseconds per I/O (fio) or per MB (copy)
            per = []
            for r in ok:
                srv, iops, mbps = fnum(r.get("srv_cores")), fnum(r.get("iops")), fnum(r.get("mbps"))
                if srv is None:
                    continue
                if WORKLOAD_INFO[w][0] == "fio" and iops:
                    per.append(srv * 1e6 / iops)
                elif WORKLOAD_INFO[w][0] == "copy" and mbps:
                    per.append(srv * 1e6 / mbps)  # CPU-us per MB
            entry["srv_us_per_op" if WORKLOAD_INFO[w][0] == "fio" else "srv_us_per_mb"] = stats(per)
            # notes of fio rows (e.g. "no multi-conn advertised"); copy rows note their nbdcopy command
            entry["notes"] = sorted({r.get("note") or "" for r in ok} - {""}) if WORKLOAD_INFO[w][0] == "fio" else []
            fr = [fnum(r.get("foreign_cores")) for r in ok]
            entry["noisy"] = sum(1 for v in fr if v is not None and v > noise_thr)
            entry["foreign_max"] = max([v for v in fr if v is not None], default=None)
            agg[(w, t)] = entry

    def primary(w, t):
        e = agg.get((w, t))
        if not e:
            return None
        st = e["iops"] if WORKLOAD_INFO[w][0] == "fio" else e["mbps"]
        return st["median"] if st else None

    for (w, t), e in agg.items():
        b, v = primary(w, baseline), primary(w, t)
        e["ratio_vs_baseline"] = (v / b) if (b and v is not None) else None

    # Peak RSS of each server's process group: the maximum over every measurement (fio workloads and the
    # nbdcopy copies, all reps) that recorded one (older results.tsv files have no srv_rss_mib column).
    peak_rss = {}
    for t in target_order:
        meas = [(fnum(r.get("srv_rss_mib")), r) for r in rows
                if r["target"] == t and r["status"] == "ok" and r["workload"] in WORKLOAD_INFO]
        meas = [(v, r) for v, r in meas if v is not None]
        if not meas:
            peak_rss[t] = None
            continue
        v, r = max(meas, key=lambda m: m[0])
        peak_rss[t] = {"mib": v, "workload": r["workload"], "rep": r["rep"],
                       "median_over_measurements": statistics.median(m[0] for m in meas),
                       "measurements": len(meas)}

    # ---- markdown ----------------------------------------------------------
    # Workloads with more than one fio job (one NBD connection each), from nbd-bench.sh's WL_JOBS.
    mj = [x.split("=", 1) for x in meta.get("config.multi_job_workloads", "").split() if "=" in x]
    multi_jobs = "".join(f" ({w}: numjobs={n}, one NBD connection per job, group_reporting)" for w, n in mj)
    md = []
    md.append(f"# NBD benchmark run {meta.get('run.id', '?')}\n")
    md.append("## Machine and run facts\n")
    facts = [
        ("date (UTC)", meta.get("run.date", "?")),
        ("host", f"{meta.get('host.nproc', '?')} CPUs, {meta.get('host.cpu_model', '?')}, "
                 f"{meta.get('host.mem', '?')} RAM, kernel {meta.get('host.kernel', '?')}"),
        ("load at start", meta.get("host.loadavg_start", "?")),
        ("load at end", meta.get("host.busy_end", "?")),
        ("tools", "; ".join(f"{k.split('.', 1)[1]} {v}" for k, v in meta.items() if k.startswith("version."))),
        ("fio settings", f"ioengine=nbd, numjobs=1{multi_jobs}, runtime {meta.get('config.runtime')} s + ramp "
                         f"{meta.get('config.ramp')} s per workload, norandommap, randrepeat=1; extra: "
                         f"`{meta.get('config.fio_extra') or 'none'}`"),
        ("disk", f"{meta.get('config.size')} per target; file-backed targets use a fresh sparse file (or a fresh "
                 f"data directory, `{{datadir}}`) in {meta.get('config.datadir')}; every target starts empty and is filled by copy_in"),
        ("repetitions", f"{meta.get('config.reps')} (target order rotated each rep); "
                        f"CPU pinning: {meta.get('config.pin')}"),
        ("context: memcpy", meta.get("context.memcpy", "not measured")),
        ("context: loopback TCP", meta.get("context.iperf3", "not measured")),
    ]
    if meta.get("context.memory_warmup"):
        facts.append(("guest memory warm-up", meta["context.memory_warmup"]))
    if meta.get("config.warm_mib", "0") not in ("0", ""):
        facts.append(("warm-up before each server start", f"wrote and removed {meta['config.warm_mib']} MiB in "
                                                          f"{meta.get('config.datadir')} (`--warm-mib`)"))
    for k, v in facts:
        md.append(f"- **{k}**: {v}")
    md.append("")
    md.append("Cells are *median (min–max)* over the successful repetitions. MB/s = 10^6 B/s. "
              "Latencies are fio completion latency (clat) percentiles in µs. "
              "`srv CPU` = CPU cores used by the server process group during the measurement "
              "(from /proc); `µs/op` = server CPU time per I/O (per MB for copies); "
              "`RSS MiB` = peak resident set size of the server process group during the measurement "
              f"(sum of VmRSS, sampled every {meta.get('config.rss_sample_interval', '0.2')} s; median over reps). "
              f"`×base` = median IOPS (fio) or MB/s (copy) relative to **{baseline}**. "
              f"`noisy` = reps where other processes on the machine used more than {noise_thr} cores "
              "during the measurement (max foreign load in brackets); notes of the harness follow it "
              "(e.g. `no multi-conn advertised` on a multi-connection workload).\n")

    hdr = ["workload", "target", "IOPS", "MB/s", "p50 µs", "p99 µs", "time s", "srv CPU", "µs/op", "RSS MiB",
           "×base", "noisy"]
    md.append("| " + " | ".join(hdr) + " |")
    md.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(hdr) - 2)) + "|")
    for w in workload_order:
        kind = WORKLOAD_INFO[w][0]
        for t in target_order:
            e = agg[(w, t)]
            if e["ok"] == 0:
                md.append(f"| {w} | {t} | " + " | ".join(["—"] * (len(hdr) - 3)) +
                          f" | FAILED {','.join(e['failed'])} |")
                continue
            per = e.get("srv_us_per_op") if kind == "fio" else e.get("srv_us_per_mb")
            ratio = e["ratio_vs_baseline"]
            if e["srv_cores"] is None:
                noisy = "n/a"  # server not ours (--uri): its CPU shows up as foreign load
            else:
                noisy = f"{e['noisy']}/{e['ok']}"
                if e["foreign_max"] is not None:
                    noisy += f" [{e['foreign_max']:.2f}]"
            if e["failed"]:
                noisy += " fail:" + ",".join(e["failed"])
            if e["notes"]:
                noisy += "; " + "; ".join(e["notes"])
            md.append("| " + " | ".join([
                w, t,
                cell(e["iops"], "iops") if kind == "fio" else "—",
                cell(e["mbps"], "mbps"),
                cell(e["p50_us"], "us", show_range=False) if kind == "fio" else "—",
                cell(e["p99_us"], "us") if kind == "fio" else "—",
                cell(e["seconds"], "s") if kind == "copy" else "—",
                cell(e["srv_cores"], "cores", show_range=False),
                fmt_num(per["median"], "us") if per else "—",
                cell(e["srv_rss_mib"], "mib", show_range=False),
                f"{ratio:.2f}" if ratio is not None else "—",
                noisy,
            ]) + " |")
    md.append("")

    # Ratio matrix: quick side-by-side view.
    md.append(f"### Throughput relative to {baseline} (median IOPS for fio rows, MB/s for copies; >1 = faster)\n")
    md.append("| workload | " + " | ".join(target_order) + " |")
    md.append("|---|" + "|".join(["---:"] * len(target_order)) + "|")
    for w in workload_order:
        cells = []
        for t in target_order:
            r = agg[(w, t)]["ratio_vs_baseline"]
            cells.append(f"{r:.2f}" if r is not None else "—")
        md.append(f"| {w} | " + " | ".join(cells) + " |")
    md.append("")

    # Data verification (copy_in, then read back and cmp with the source).
    ver = {}
    for r in rows:
        if r["workload"] == "verify":
            ver.setdefault(r["target"], []).append(f"rep{r['rep']}:{r['status']}")
    if ver:
        md.append("**Data verification** (read back after copy_in, cmp with source): " + "; ".join(
            f"{t} {'ok' if all(x.endswith(':ok') for x in v) else ' '.join(v)}" for t, v in ver.items()) + "\n")

    if any(peak_rss.values()):
        md.append("### Peak RSS per server (MiB, max over all workloads and reps)\n")
        md.append("Resident set size of the server's whole process group (sum of VmRSS from /proc/PID/status "
                  f"over its processes), sampled every {meta.get('config.rss_sample_interval', '0.2')} s during "
                  "each measurement (fio workloads and the nbdcopy copies); `median` is the median of the "
                  "per-measurement peaks.\n")
        md.append("| target | peak RSS MiB | reached in | median MiB | measurements |")
        md.append("|---|---:|---|---:|---:|")
        for t in target_order:
            p = peak_rss.get(t)
            if not p:
                md.append(f"| {t} | — | not measured (not started by the harness, or no successful measurement) "
                          "| — | 0 |")
                continue
            md.append(f"| {t} | {fmt_num(p['mib'], 'mib')} | {p['workload']} rep {p['rep']} | "
                      f"{fmt_num(p['median_over_measurements'], 'mib')} | {p['measurements']} |")
        md.append("")

    md.append("### Targets\n")
    md.append("| target | kind | multi-conn | flush | fua | command / URI |")
    md.append("|---|---|---|---|---|---|")
    for t in targets:
        cmd = t.get("command") or t.get("uri", "")
        md.append(f"| {t['name']} | {t['kind']} | {t.get('multi_conn', '?')} | {t.get('flush', '?')} | "
                  f"{t.get('fua', '?')} | `{cmd}` |")
    md.append("")
    md.append("Workloads: " + "; ".join(f"`{w}` = {WORKLOAD_INFO[w][1]}" for w in workload_order) + ".")
    md.append("nbdcopy uses its defaults (multi-conn up to min(4, nproc) connections when the server "
              "advertises it, 64 requests of 256 KiB in flight per connection); copy_out uses "
              "`--no-extents` so every byte is read; copy_in uses `--flush` when the server "
              "advertises FLUSH. fio sends no FLUSH/FUA unless `--fio-extra` asks for it.")
    md.append("")

    with open(os.path.join(run_dir, "summary.md"), "w") as f:
        f.write("\n".join(md))

    out = {
        "run": {k: v for k, v in meta.items()},
        "baseline": baseline,
        "targets": targets,
        "results": [agg[(w, t)] for w in workload_order for t in target_order],
        "verification": ver,
        "peak_rss_mib": peak_rss,
    }
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(out, f, indent=1)
    print("\n".join(md))


if __name__ == "__main__":
    main()
