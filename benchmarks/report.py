"""Printed reports of the benchmarks' JSON: what a run measured, as tables; nothing is measured here.

``bench_kernels.py`` and ``bench_rounds.py`` print ``kernels_report`` / ``rounds_report`` of the
document they wrote (``qlora_table`` for ``bench_rounds.py --patterns``); ``python benchmarks/report.py FILE.json`` prints the same from a saved file
(a result committed under ``benchmarks/results/``, or one a lent GPU sent back).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

__all__ = ["detail_table", "headline_report", "kernel_table", "kernels_report", "kernels_table", "qlora_table",
           "rounds_report", "rounds_table"]

PHASES = ("fwd", "bwd", "fwd_bwd")  # the phases of a kernel case's record, in the order printed
ROUND_IMPLS = ("sequential", "batched", "peft")  # the memory column's implementations, in order


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _median(record: dict, impl: str, phase: str) -> float | None:
    entry = record.get("impls", {}).get(impl, {})
    return entry[phase]["median_ms"] if entry.get("status") == "ok" else None


def kernels_table(records: Sequence[dict]) -> str:
    """One line per case: whole-layer fwd+bwd medians (ms), the Triton ratios and csrc's over the loop."""
    head = (f"{'case':<40} {'base':>8} {'triton':>8} {'torch':>8} {'bmm':>8} {'csrc':>8} "
            f"{'xLoop':>6} {'xBmm':>6} {'ovh/base':>8} {'norm%':>6} {'cLoop':>6}")
    lines = ["fwd+bwd medians in ms (whole layer); xLoop/xBmm: LoRA-path speedup of triton; "
             "ovh/base: triton LoRA path / base; norm%: fused-norm cost of the backward; "
             "cLoop: LoRA-path speedup of csrc over the torch loop", head,
             "-" * len(head)]
    for rec in records:
        if rec.get("status") != "ok":
            lines.append(f"{rec['name']:<40} skipped: {rec.get('note', '')}")
            continue
        r = rec["ratios"]
        norm = r.get("fused_norm_cost_frac_of_bwd")
        lines.append(
            f"{rec['name']:<40} "
            + " ".join(f"{_fmt(_median(rec, i, 'fwd_bwd')):>8}"
                       for i in ("base", "triton", "torch", "bmm", "csrc"))
            + f" {_fmt(r['lora_speedup_vs_torch_loop'].get('triton', {}).get('fwd_bwd'), '.2f'):>6}"
            + f" {_fmt(r['lora_speedup_vs_bmm'].get('triton', {}).get('fwd_bwd'), '.2f'):>6}"
            + f" {_fmt(r['lora_overhead_vs_base'].get('triton', {}).get('fwd_bwd'), '.3f'):>8}"
            + f" {_fmt(None if norm is None else 100 * norm, '.1f'):>6}"
            + f" {_fmt(r['lora_speedup_vs_torch_loop'].get('csrc', {}).get('fwd_bwd'), '.2f'):>6}")
    return "\n".join(lines)


def detail_table(record: dict) -> str:
    """Per-implementation medians of one case, whole layer and LoRA path, in the order they ran."""
    head = (f"{'impl':<14} {'fwd':>9} {'bwd':>9} {'fwd+bwd':>9} {'lora fwd':>9} {'lora bwd':>9} "
            f"{'lora f+b':>9}  status")
    lines = [f"{record['name']}  (ms, medians; lora = impl - base)", head, "-" * len(head)]
    for name, entry in record.get("impls", {}).items():
        if entry.get("status") != "ok":
            lines.append(f"{name:<14} {entry.get('status')}: {entry.get('note', '')}")
            continue
        lora = entry.get("lora_ms", {})
        lines.append(f"{name:<14} " + " ".join(f"{_fmt(entry[p]['median_ms']):>9}" for p in PHASES)
                     + " " + " ".join(f"{_fmt(lora.get(p)):>9}" for p in PHASES) + "  ok")
    return "\n".join(lines)


def kernel_table(record: dict, copy: dict | None) -> list[str]:
    """Per-kernel device times of the Triton forward+backward (K4: GB/s against the byte model
    and against the copy bandwidth of the run), the LoRA kernels' total, and host vs device time."""
    profile = record.get("profile", {}).get("triton")
    if not profile or "kernels" not in profile:
        return []
    bw = f"{copy['bytes_per_s'] / 1e9:.0f} GB/s" if copy else "not measured"
    lines = [f"{record['name']}: kernels of one triton fwd+bwd (copy bandwidth {bw}; paired with the byte model: "
             f"{'yes' if profile.get('matched') else 'no'})",
             f"  {'kernel':<44} {'us':>9} {'model MB':>9} {'GB/s':>7} {'of copy':>8}"]
    for k in profile.get("lora_kernels", []) + profile.get("other_kernels", []):
        mb = f"{k['bytes'] / 1e6:.1f}" if "bytes" in k else "-"
        gbps = f"{k['gbps']:.0f}" if k.get("gbps") else "-"
        frac = f"{100 * k['frac_of_copy']:.0f} %" if k.get("frac_of_copy") else "-"
        lines.append(f"  {k['name'][:44]:<44} {k['median_us']:>9.1f} {mb:>9} {gbps:>7} {frac:>8}")
    total = profile.get("lora_total", {})
    if "vs_model" in total:
        r = total["vs_model"]
        frac = f", {100 * r['frac_of_copy']:.0f} % of copy" if r.get("frac_of_copy") else ""
        lines.append(f"  LoRA kernels together: {total['device_us']:.1f} us = {r['gbps']:.0f} GB/s against "
                     f"the byte model{frac}")
    hvd = record.get("host_vs_device", {})
    if "host_ms" in hvd:
        lines.append(f"  host vs device per fwd+bwd call: host {hvd['host_ms']:.3f} ms to enqueue, device "
                     f"{hvd['device_ms']:.3f} ms (host/device {hvd['host_over_device']:.2f}; near 1 = launch-bound "
                     "or syncing)")
    return lines


def headline_report(headline: dict, goals: dict[str, dict]) -> str:
    """The headline case's goal ratios (``doc["headline"]``) against ``goals`` (``meta.goals``)."""
    lines = [f"Headline case {headline['case']} (goals):"]
    for key, spec in goals.items():
        value, op, goal = headline.get(key), spec["op"], spec["value"]
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        verdict = "n/a" if met is None else ("MET" if met else "NOT MET")
        lines.append(f"  {key:<38} {_fmt(value, '.3f'):>8}  goal {op} {goal:g}  {verdict}")
    return "\n".join(lines)


def rounds_table(records: Sequence[dict], cuda: bool, task: str) -> str:
    """One line per case: median round times (s), batched speedups, memory (MiB) per implementation;
    the first line names the ``task`` the rounds trained."""
    mem = "CUDA peak MiB" if cuda else "state MiB"
    head = (f"{'case':<18} {'seq s':>8} {'batch s':>8} {'peft s':>8} {'b/seq':>6} {'b/peft':>6}  "
            f"{mem + ' seq/batch/peft':<30} guard")
    lines = [f"task {task}: median wall time of one round (s); b/seq, b/peft: speedup of batched; "
             "memory per implementation "
             + ("(max_memory_allocated)" if cuda else "(params + peak grads + optimizer state)"),
             head, "-" * len(head)]
    for rec in records:
        if rec.get("status") != "ok":
            lines.append(f"{rec['name']:<18} {rec.get('status')}: {rec.get('note', '')}")
            continue
        impls, ratios = rec["impls"], rec["ratios"]

        def med(name: str) -> float | None:
            e = impls.get(name, {})
            return e["round_s"]["median_s"] if e.get("status") == "ok" else None

        def mib(name: str) -> str:
            e = impls.get(name, {})
            value = e.get("cuda_peak_bytes") if cuda else e.get("state_bytes", {}).get("total")
            return "-" if value is None else f"{value / 2**20:.1f}"

        guard = ",".join(f"{k}:{v['state_max_rel_err']:.1e}" for k, v in rec["guard"].items()) or "-"
        lines.append(
            f"{rec['name']:<18} {_fmt(med('sequential'), '.3f'):>8} {_fmt(med('batched'), '.3f'):>8} "
            f"{_fmt(med('peft'), '.3f'):>8} "
            f"{_fmt(ratios['speedup_vs_sequential'].get('batched'), '.2f'):>6} "
            f"{_fmt(ratios['speedup_vs_peft'].get('batched'), '.2f'):>6}  "
            f"{'/'.join(mib(i) for i in ROUND_IMPLS):<30} {guard}")
    return "\n".join(lines)


def kernels_report(doc: dict) -> str:
    """Everything ``bench_kernels.py`` prints after a run: each case's table (at most 8 cases), the
    summary, the headline goals and the per-kernel profiles."""
    ran = [r for r in doc["cases"] if r.get("status") == "ok"]
    parts = [detail_table(record) for record in ran] if 0 < len(ran) <= 8 else []
    parts.append(kernels_table(doc["cases"]))
    if "headline" in doc:
        parts.append(headline_report(doc["headline"], doc["meta"]["goals"]))
    kernel_lines = [line for record in ran for line in kernel_table(record, doc["meta"].get("copy_bandwidth"))]
    if kernel_lines:
        parts.append("\n".join(kernel_lines))
    return "\n\n".join(parts)


def rounds_report(doc: dict) -> str:
    """What ``bench_rounds.py`` prints after a run: one line per case."""
    # Results written before the causal-LM task existed name no task: they are classification.
    return rounds_table(doc["cases"], doc["meta"]["device_type"] == "cuda", doc["meta"].get("task", "classification"))


def qlora_table(records: Sequence[dict], cuda: bool) -> str:
    """``qlora_patterns.py``'s report: one line per (model, N, pattern), in the order the models and
    patterns first appear: round time, peak, the floor, peak / floor."""
    gib = 2.0 ** 30
    mem = "CUDA max_memory_allocated" if cuda else "peak RSS"
    head = f"{'model':<11} {'N':>3} {'pattern':<11} {'round s':>10} {'peak GiB':>9} {'floor GiB':>9} {'peak/floor':>10}"
    lines = [f"one round per case, fresh process each; peak = {mem}; floor: see qlora_patterns.py", head,
             "-" * len(head)]
    models = list(dict.fromkeys(r["model"] for r in records))
    patterns = list(dict.fromkeys(r["pattern"] for r in records))
    for r in sorted(records, key=lambda r: (models.index(r["model"]), r["n"], patterns.index(r["pattern"]))):
        if r["status"] not in ("ok", "scaled"):
            lines.append(f"{r['model']:<11} {r['n']:>3} {r['pattern']:<11} {r['status']}: {r.get('note', '')}")
            continue
        mark = "*" if r["round_s_extrapolated"] else " "
        lines.append(f"{r['model']:<11} {r['n']:>3} {r['pattern']:<11} {r['round_s_full']:>9.2f}{mark} "
                     f"{r['peak_bytes'] / gib:>9.3f} {r['floor_bytes'] / gib:>9.3f} {r['peak_over_floor']:>10.3f}"
                     + ("  (N x N=1)" if r["status"] == "scaled" else ""))
    lines.append("* extrapolated: N / clients trained x the measured time")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the tables of a bench_kernels.py or bench_rounds.py JSON file.")
    parser.add_argument("path", help="the JSON file a benchmark wrote")
    args = parser.parse_args(argv)
    with open(args.path) as f:
        doc = json.load(f)
    # A QLoRA patterns run's cases name patterns; a round benchmark's grid names models; a kernel
    # benchmark's names sizes.
    if any("pattern" in case for case in doc.get("cases", [])):
        print(qlora_table(doc["cases"], doc["meta"]["device_type"] == "cuda"))
    else:
        print(rounds_report(doc) if "models" in doc.get("grid", {}) else kernels_report(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
