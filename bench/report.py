"""The markdown report of a benchmark run."""

from __future__ import annotations

import datetime
import platform

import torch

import fxattr

# ------------------------------------------------------------------------------------ report

def fmt_s(s) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def fmt_x(r) -> str:
    return "-" if r is None else f"{r:.2f}x"


def target_str(row) -> str:
    t = row["target"]
    if t is None:
        return ""
    kind, value = t if isinstance(t, tuple) else ("floor", t)
    ratio = row["x_peer"] if kind == "peer" else row["x_floor"]
    mark = "" if ratio is None else (" ok" if ratio <= value else " MISS")
    return f"<= {value:g}x {kind}{mark}"


def markdown(rows, sweep_rows, extra, args, device) -> str:
    lines = [f"# fxattr benchmark on {device.type}", ""]
    lines.append(f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}; torch {torch.__version__}; "
                 f"fxattr {fxattr.__version__}; python {platform.python_version()}; "
                 f"{platform.machine()} {torch.get_num_threads()} threads"
                 + (f"; {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    lines.append(f"- clock: {args.clock} ({'CPU time of this process' if args.clock == 'process' else 'wall time'})")
    lines.append(f"- batch {args.batch}, input 3x{args.size}x{args.size}, float32, eval mode, random weights; "
                 f"medians over {args.repeats} interleaved repeats; IG {args.steps} steps ({args.ig_method}, "
                 f"fxattr chunk_size={args.ig_chunk or 'None'}, captum internal_batch_size=chunk x batch); "
                 f"smoothgrad {args.samples} samples (fxattr chunk_size={args.sg_chunk or 'None'})")
    lines.append("- floor = one forward + one torch.autograd.grad of the selected logits' sum w.r.t. the "
                 "input, parameters frozen, timed inside each block; x floor = median / that block's floor "
                 "median; x peer = median / fastest peer's median; compile = first call of the compiled "
                 "function (tracing + compiling + one run, wall time), excluded from the median")
    for line in extra:
        lines.append(f"- {line}")
    lines += ["", "| model | method | implementation | median (min-max, n) | x floor | target | x peer | compile | note |",
              "|---|---|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        target = target_str(r)
        note = r["note"]
        if r["check"] is not None:
            errs = r["check"]
            if len(errs) <= 8:
                text = "/".join(f"{e:.0e}" for e in errs) + " per example"
            else:
                text = f"{errs[len(errs) // 2]:.0e} (median example), worst {errs[-1]:.0e}"
            note = (note + f" max rel err vs peer {text}").strip()
        spread = "" if r["spread"] is None else (f" ({fmt_s(r['spread'][0])}-{fmt_s(r['spread'][1])}, "
                                                 f"{r['n']})")
        lines.append(f"| {r['model']} | {r['method']} | {r['impl']} | {fmt_s(r['median'])}{spread} | "
                     f"{fmt_x(r['x_floor'])} | {target} | {fmt_x(r['x_peer'])} | {fmt_s(r['compile'])} | "
                     f"{note.replace('|', '/')} |")
    if sweep_rows:
        lines += ["", "## chunk_size sweep (eager unless marked; memory = peak added by the first call)", "",
                  "| model | batch | variant | median (n) | x floor | peak memory |", "|---|---|---|---:|---:|---:|"]
        for r in sweep_rows:
            mem = "-" if r.get("memory") is None else f"+{r['memory'] / 2**20:.0f} MiB"
            lines.append(f"| {r['model']} | {r['batch']}x3x{r['size']}x{r['size']} | {r['variant']} | "
                         f"{fmt_s(r['median'])} ({r['n']}) | {r['x_floor']:.2f}x | {mem} |")
    return "\n".join(lines) + "\n"


