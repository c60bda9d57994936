"""Timing harness: benchmark models, process/wall clocks, peak memory, the per-method block
runner (floor, fxattr eager and compiled, peers, interleaved repeats) and the chunk sweep."""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import statistics
import time
import traceback
import warnings
from collections import OrderedDict

import torch
from torch import nn

import fxattr

from methods import METHODS, fx_ig, fx_smoothgrad
from report import fmt_s, fmt_x, target_str

HERE = os.path.dirname(os.path.abspath(__file__))

# --------------------------------------------------------------------------------------- models

LAYERS = {"resnet18": "layer4", "vgg11": "features.20", "small_cnn": "relu3"}


def small_cnn() -> nn.Module:
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 16, 3, padding=1)), ("bn1", nn.BatchNorm2d(16)), ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(16, 32, 3, padding=1)), ("bn2", nn.BatchNorm2d(32)), ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("conv3", nn.Conv2d(32, 64, 3, padding=1)), ("relu3", nn.ReLU()),
        ("gap", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(64, 10)),
    ]))


def build_model(name: str) -> nn.Module:
    import torchvision
    torch.manual_seed(0)
    if name == "resnet18":
        model = torchvision.models.resnet18(weights=None)
    elif name == "vgg11":
        model = torchvision.models.vgg11(weights=None)
    elif name == "small_cnn":
        model = small_cnn()
    else:
        raise SystemExit(f"unknown model {name!r}")
    # Random but non-trivial batch-norm statistics, so the BN path does real work.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of the model with requires_grad off (the bench's own copy; fxattr never mutates)."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------- timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK = {"fn": time.perf_counter}


def timed(fn, device):
    """(seconds, result) of one call, by the chosen clock: wall time, or on a CPU shared with other
    processes this process's CPU time (``--clock process``), which does not count the time the OS
    gave our thread to someone else (one torch thread: the work runs on this thread)."""
    sync(device)
    clock = CLOCK["fn"]
    start = clock()
    out = fn()
    sync(device)
    return clock() - start, out


class PeakRSS:
    """Samples this process's resident memory every 10 ms while a call runs (CPU memory only)."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def __call__(self, fn):
        import ctypes
        import threading
        gc.collect()
        try:   # give freed heap pages back to the OS, so that the peak counts fresh pages only
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        base, peak, stop = self.rss(), [0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], self.rss())
                stop.wait(0.01)
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            fn()
        finally:
            stop.set()
            thread.join()
        return max(0, peak[0] - base)


def rel_err(a, b) -> float:
    a = torch.as_tensor(a).detach().to("cpu", torch.float64)
    b = torch.as_tensor(b).detach().to("cpu", torch.float64).reshape(a.shape)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


class Ctx:
    """What a method factory gets: the model, its functional form, the batch and the settings."""

    def __init__(self, name, model, frozen, f, params, x, t, args):
        self.name, self.model, self.frozen, self.f, self.params = name, model, frozen, f, params
        self.x, self.t, self.args = x, t, args
        self.layer_name = LAYERS[name]
        self.layer = frozen.get_submodule(self.layer_name)
        self.exit = contextlib.ExitStack()   # peers that hold hooks while they are timed

    def model_copy(self):
        return frozen_copy(self.model)




# ------------------------------------------------------------------------------------ running

class Collector:
    """Catches vmap's 'performance drop' fallback warnings and names the ops."""

    def __init__(self):
        self.ops = set()

    @contextlib.contextmanager
    def watch(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for w in caught:
            msg = str(w.message)
            if "performance drop" in msg and "batching rule" in msg:
                op = msg.split("for ")[1].split(".")[0] if "for " in msg else msg[:60]
                self.ops.add(op.strip())


def compile_fn(fn, fullgraph=True):
    return torch.compile(fn, fullgraph=fullgraph)


def run_block(rows, model_name, method, c, floor, args, device):
    attr, fx_factory, randomness, peers, same_numbers, target = METHODS[method]
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {model_name} / {method}", flush=True)
    impls = OrderedDict()   # label -> callable
    notes = {}
    compile_s = {}
    outputs = {}
    fallbacks = Collector()
    warm = {}
    floors = [timed(floor, device)[0]]
    if (method == "scorecam" and device.type == "cpu" and model_name != "small_cnn"
            and not args.force):
        note = ("skipped on CPU: Score-CAM runs one forward per channel of the layer per image "
                f"(512 x {c.x.shape[0]} passes here, hours on 2 shared cores); --force or --device cuda")
        print(f"  {note}")
        rows.append({"model": model_name, "method": method, "impl": "(all)", "median": None,
                     "floor": None, "x_floor": None, "x_peer": None, "compile": None, "target": None,
                     "check": None, "note": note, "spread": None, "n": 0})
        return
    if hasattr(fxattr, attr):
        try:
            explain = fx_factory(c)
            batched = torch.vmap(explain, in_dims=(None, 0, 0), randomness=randomness)
            with fallbacks.watch():
                warm["fxattr eager"], outputs["fxattr eager"] = timed(lambda: batched(c.params, c.x, c.t), device)
            impls["fxattr eager"] = lambda: batched(c.params, c.x, c.t)
            if fallbacks.ops:
                notes["fxattr eager"] = "vmap fallback: " + ", ".join(sorted(fallbacks.ops))
        except Exception as error:  # noqa: BLE001 - reported in the table
            notes["fxattr eager"] = f"error: {type(error).__name__}: {str(error)[:160]}"
            traceback.print_exc()
        compile_here = (not args.no_compile
                        and (args.compile_models is None or model_name in args.compile_models.split(","))
                        and (args.compile_methods is None or method in args.compile_methods.split(",")))
        if "fxattr eager" in impls and not compile_here:
            notes["fxattr compiled"] = "not compiled in this run (compile time; see --compile-methods)"
        if "fxattr eager" in impls and compile_here:
            torch._dynamo.reset()
            for fullgraph in (True, False):
                try:
                    comp = compile_fn(batched, fullgraph=fullgraph)
                    start = time.perf_counter()   # compile time: wall (compile workers are processes)
                    _, outputs["fxattr compiled"] = timed(lambda: comp(c.params, c.x, c.t), device)
                    seconds = time.perf_counter() - start
                    impls["fxattr compiled"] = lambda: comp(c.params, c.x, c.t)
                    compile_s["fxattr compiled"] = seconds
                    if not fullgraph:
                        notes["fxattr compiled"] = "fullgraph=False (graph breaks)"
                    break
                except Exception as error:  # noqa: BLE001
                    notes["fxattr compiled"] = f"error: {type(error).__name__}: {str(error)[:160]}"
                    if fullgraph:
                        print(f"  fullgraph compile failed ({type(error).__name__}); retrying fullgraph=False")
                    else:
                        traceback.print_exc()
    else:
        notes["fxattr eager"] = f"skipped: fxattr.{attr} does not exist yet"
        print(f"  {notes['fxattr eager']}")
    for label, factory in peers:
        try:
            fn = factory(c)
            warm[label], outputs[label] = timed(fn, device)   # warm-up (and the agreement check)
            impls[label] = fn
        except Exception as error:  # noqa: BLE001
            notes[label] = f"error: {type(error).__name__}: {str(error)[:160]}"
            print(f"  {label}: {notes[label]}")
    if "fxattr compiled" in outputs and "fxattr eager" in outputs:
        a, b = outputs["fxattr compiled"], outputs["fxattr eager"]
        errs = sorted(rel_err(a[i], b[i]) for i in range(a.shape[0]))
        if errs[len(errs) // 2] > 1e-3 and randomness == "error":
            notes["fxattr compiled"] = (notes.get("fxattr compiled", "") + f" MISMATCH vs eager {errs[len(errs) // 2]:.1e}").strip()
    check = None
    if same_numbers and peers and "fxattr eager" in outputs and peers[0][0] in outputs:
        # Per example: a near-tie in a max pool or ReLU, decided differently by the last bit of
        # the element-wise batch norm, routes one example's gradient elsewhere; report it apart.
        a, b = outputs["fxattr eager"], torch.as_tensor(outputs[peers[0][0]]).reshape(outputs["fxattr eager"].shape)
        check = sorted(rel_err(a[i], b[i]) for i in range(a.shape[0]))
    outputs.clear()
    # Slow blocks (IG on vgg11 is minutes a call on 2 shared cores): the warm-up call counts as a
    # sample (not for compiled: it compiles), and repeats are cut to fit --block-budget seconds.
    heavy = sum(warm.values()) > args.heavy_s
    times = {label: [warm[label]] if heavy and label in warm else [] for label in impls}
    if heavy:
        floors.append(timed(floor, device)[0])
    per_repeat = floors[0] + sum(warm.values()) + warm.get("fxattr eager", 0.0) * ("fxattr compiled" in impls)
    repeats = max(1, min(args.repeats - heavy, int(args.block_budget / max(per_repeat, 1e-9))))
    if impls:
        for _ in range(repeats):
            floors.append(timed(floor, device)[0])
            for label, fn in impls.items():
                times[label].append(timed(fn, device)[0])
                if args.verbose:
                    print(f"    {label}: {fmt_s(times[label][-1])}", flush=True)
    c.exit.close()
    floor_med = statistics.median(floors) if floors else None
    peer_meds = [statistics.median(times[p]) for p, _ in peers if p in times]
    best_peer = min(peer_meds) if peer_meds else None
    if isinstance(target, str):
        target = float(getattr(args, target))
    for label in ["fxattr eager", "fxattr compiled"] + [p for p, _ in peers]:
        if label not in impls and label not in notes:
            continue
        med = statistics.median(times[label]) if label in times else None
        is_fx = label.startswith("fxattr")
        row = {
            "model": model_name, "method": method, "impl": label, "median": med, "floor": floor_med,
            "x_floor": None if med is None or not floor_med else med / floor_med,
            "x_peer": None if med is None or not best_peer or not is_fx else med / best_peer,
            "compile": compile_s.get(label), "target": target if is_fx else None,
            "check": check if label == "fxattr eager" else None, "note": notes.get(label, ""),
            "spread": None if med is None else (min(times[label]), max(times[label])),
            "n": len(times.get(label, ())),
        }
        rows.append(row)
        print(f"  {label:<30} {fmt_s(med):>10}  {fmt_x(row['x_floor']):>8} floor"
              f"  {fmt_x(row['x_peer']):>7} peer  compile {fmt_s(row['compile']):>9}  {target_str(row)}  {row['note']}",
              flush=True)
    if floor_med:
        print(f"  {'(floor in this block)':<30} {fmt_s(floor_med):>10}")
    if check is not None:
        print(f"  fxattr vs {peers[0][0]}: rel err per example {', '.join(f'{e:.0e}' for e in check)}")
    gc.collect()


def sweep_chunks(sweep_rows, model_name, c, floor, args, device):
    """Times IG and smoothgrad for several chunk sizes, interleaved with the floor."""
    variants = []
    for chunk in args.ig_chunks:
        variants.append((f"ig steps={args.steps} chunk={chunk or 'all'}", fx_ig(c, chunk), "error"))
    for chunk in args.sg_chunks:
        variants.append((f"smoothgrad samples={args.samples} chunk={chunk or 'all'}",
                         fx_smoothgrad(c, chunk), "different"))
    fns = OrderedDict()
    memory, warm = {}, {}
    peak = PeakRSS()
    for label, explain, randomness in variants:
        batched = torch.vmap(explain, in_dims=(None, 0, 0), randomness=randomness)
        fns[label] = (lambda b=batched: b(c.params, c.x, c.t))
        gc.collect()
        if device.type == "cpu":
            start = CLOCK["fn"]()
            memory[label] = peak(fns[label])   # warm-up, measuring the memory it adds
            warm[label] = CLOCK["fn"]() - start
        else:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            timed(fns[label], device)
            memory[label] = torch.cuda.max_memory_allocated(device) - base
        if args.sweep_compiled and not args.no_compile:
            torch._dynamo.reset()
            comp = compile_fn(batched, fullgraph=False)
            fn = (lambda b=comp: b(c.params, c.x, c.t))
            timed(fn, device)
            fns[label + " compiled"] = fn
    # Multi-second calls: the warm-up (which measured memory) counts as a sample too.
    times = {label: [warm[label]] if warm.get(label, 0) > 5 else [] for label in fns}
    floors = [timed(floor, device)[0]]
    print(f"[{time.strftime('%H:%M:%S')}] {model_name} / chunk sweep", flush=True)
    for _ in range(args.repeats):
        for label, fn in fns.items():
            floors.append(timed(floor, device)[0])
            times[label].append(timed(fn, device)[0])
    floor_med = statistics.median(floors)
    for label in fns:
        med = statistics.median(times[label])
        mem = memory.get(label)
        sweep_rows.append({"model": model_name, "variant": label, "median": med, "x_floor": med / floor_med,
                           "memory": mem, "n": len(times[label]), "batch": args.batch, "size": args.size})
        print(f"  {label:<40} {fmt_s(med):>10}  {med / floor_med:6.2f}x floor  "
              f"peak +{(mem or 0) / 2**20:.0f} MiB", flush=True)
    print(f"  {'(floor)':<40} {fmt_s(floor_med):>10}")


