#!/usr/bin/env python
"""fxattr benchmark: every explainer against the autograd floor and its peer, in ONE process.

For each model (torchvision resnet18 and vgg11 with random weights, and a small CNN; eval mode) and
each method, the script times, interleaved repeat by repeat so that CPU contention hits all alike:

- the **autograd floor**: what a plain-torch user writes for saliency -- one forward of the batch
  and one ``torch.autograd.grad`` of the selected logits' sum with respect to the input, with the
  parameters not requiring grad (fxattr's params are detached too, and a frozen model is the
  fastest plain-torch version, so this is the strictest floor; the variant with parameters
  requiring grad, nn.Module's default, is timed once per model as ``floor_params_grad``);
- the fxattr explainer applied to the batch as ``torch.vmap(explain, in_dims=(None, 0, 0))``,
  eager, and the same under ``torch.compile`` (compile time excluded from the median and reported
  separately: the first call's time);
- the peer implementations (captum, zennit, pytorch-grad-cam, or a plain-torch loop), set up the
  way their docs show, on the same frozen model copy.

It prints medians over ``--repeats`` and ratios to the floor measured in the same block (and to the
fastest peer), checks that fxattr and a deterministic peer agree (max relative error), and writes a
markdown table to ``bench/results/<device>.md``. Methods that fxattr does not have yet are skipped
with a note. ``--sweep-chunks`` measures integrated gradients' and smoothgrad's ``chunk_size``.

    python bench/bench.py --quick                      # smoke test, small images
    python bench/bench.py                              # full CPU run (tens of minutes on 2 cores)
    python bench/bench.py --device cuda --repeats 10   # on a GPU
    python bench/bench.py --models resnet18 --methods ig --sweep-chunks
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections import OrderedDict

os.environ.setdefault("TQDM_DISABLE", "1")   # ScoreCAM's progress bars
# On a CPU shared with other processes, OpenMP's default spin-waiting makes every parallel region
# wait for a descheduled thread: resnet18's floor measured 6x slower with 2 threads than with 1
# (and 10x noisier). Passive waiting avoids the worst of it; --threads defaults to 1 on CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fxattr  # noqa: E402

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


def fmt_s(s) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def fmt_x(r) -> str:
    return "-" if r is None else f"{r:.2f}x"


# ------------------------------------------------------------------------------------ methods

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


def captum_saliency(c):
    from captum.attr import Saliency
    sal = Saliency(c.frozen)
    return lambda: sal.attribute(c.x, target=c.t, abs=False)


def captum_ig(c):
    from captum.attr import IntegratedGradients
    ig = IntegratedGradients(c.frozen)
    # The same number of rows per forward as fxattr's chunks (steps per chunk x batch), so both
    # hold about the same memory; captum's default (all steps at once) is 256 rows at batch 8.
    chunk = c.args.ig_chunk or c.args.steps
    return lambda: ig.attribute(c.x, target=c.t, n_steps=c.args.steps, method=c.args.ig_method,
                                internal_batch_size=chunk * c.x.shape[0])


def captum_smoothgrad(c):
    from captum.attr import NoiseTunnel, Saliency
    nt = NoiseTunnel(Saliency(c.frozen))
    std = 0.15 * float(c.x.max() - c.x.min())
    # the same rows per forward as fxattr's chunks (samples per chunk x batch)
    return lambda: nt.attribute(c.x, target=c.t, nt_type="smoothgrad", nt_samples=c.args.samples,
                                nt_samples_batch_size=c.args.sg_chunk or None, stdevs=std, abs=False)


def _zennit(c, composite_name):
    from zennit import composites
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer
    canon = {"resnet18": ResNetCanonizer, "vgg11": VGGCanonizer}.get(c.name, SequentialMergeBatchNorm)()
    composite = getattr(composites, composite_name)(canonizers=[canon])
    model = c.model_copy()          # canonizers rewrite the model while attached: keep it private
    attributor = c.exit.enter_context(Gradient(model=model, composite=composite))
    out_dim = c.frozen(c.x[:1]).shape[1]
    one_hot = torch.nn.functional.one_hot(c.t, out_dim).to(c.x.dtype)
    return lambda: attributor(c.x, one_hot)[1]


def zennit_epsilon_plus_flat(c):
    return _zennit(c, "EpsilonPlusFlat")


def zennit_epsilon_alpha2_beta1(c):
    return _zennit(c, "EpsilonAlpha2Beta1")


def captum_layer_gradcam(c):
    from captum.attr import LayerAttribution, LayerGradCam
    cam = LayerGradCam(c.frozen, c.layer)
    size = tuple(c.x.shape[-2:])
    return lambda: LayerAttribution.interpolate(cam.attribute(c.x, target=c.t, relu_attributions=True),
                                                size, "bilinear")


def _pytorch_grad_cam(c, cls, **attrs):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    # pytorch-grad-cam calls loss.backward() on the output and needs parameters that require grad
    # (it does not make the input require grad): its documented set-up, weight gradients included.
    model = copy.deepcopy(c.model)
    cam = cls(model=model, target_layers=[model.get_submodule(c.layer_name)])
    for k, v in attrs.items():
        setattr(cam, k, v)
    c.exit.callback(cam.activations_and_grads.release)
    targets = [ClassifierOutputTarget(int(i)) for i in c.t]
    return lambda: cam(input_tensor=c.x, targets=targets)


def gradcam_lib_gradcam(c):
    from pytorch_grad_cam import GradCAM
    return _pytorch_grad_cam(c, GradCAM)


def gradcam_lib_scorecam(c):
    from pytorch_grad_cam import ScoreCAM
    return _pytorch_grad_cam(c, ScoreCAM, batch_size=c.args.mask_chunk)


def captum_deeplift(c):
    from captum.attr import DeepLift
    dl = DeepLift(c.model_copy())
    return lambda: dl.attribute(c.x, target=c.t, baselines=0.0)


def occlusion_geometry(c):
    size = c.x.shape[-1]
    window = max(1, size // 4) if c.args.occlusion_window is None else c.args.occlusion_window
    stride = window if c.args.occlusion_stride is None else c.args.occlusion_stride
    return window, stride


def captum_occlusion(c):
    from captum.attr import Occlusion
    occ = Occlusion(c.frozen)
    w, s = occlusion_geometry(c)
    return lambda: occ.attribute(c.x, target=c.t, sliding_window_shapes=(c.x.shape[1], w, w),
                                 strides=(c.x.shape[1], s, s), baselines=0.0,
                                 perturbations_per_eval=c.args.mask_chunk)


def bench_rise_masks(c):
    """Fixed RISE masks ``(N, H, W)`` shared by fxattr and the reference loop (Petsiuk et al.'s
    masks: 7x7 cells kept with p=0.5, upsampled bilinearly, shifted by less than a cell)."""
    if not hasattr(c, "_rise_masks"):
        torch.manual_seed(0)
        if hasattr(fxattr, "rise_masks"):
            masks = fxattr.rise_masks(tuple(c.x.shape[-2:]), num_masks=c.args.rise_masks,
                                      cell_size=7, p=0.5)
        else:
            masks = (torch.rand(c.args.rise_masks, *c.x.shape[-2:]) < 0.5).float()
        c._rise_masks = masks.to(c.x.device, c.x.dtype)
    return c._rise_masks


def torch_rise(c):
    """The reference RISE loop (Petsiuk et al.'s code), batched over the examples: chunks of masked
    copies (batch x mask_chunk rows per forward, as fxattr's vmap) through the model."""
    masks = bench_rise_masks(c)
    n, chunk = masks.shape[0], c.args.mask_chunk
    rows = torch.arange(c.x.shape[0], device=c.x.device)

    @torch.no_grad()
    def run():
        b, ch, h, w = c.x.shape
        sal = torch.zeros(b, h * w, dtype=c.x.dtype, device=c.x.device)
        for i in range(0, n, chunk):
            m = masks[i:i + chunk]
            out = c.frozen((c.x[:, None] * m[None, :, None]).reshape(-1, ch, h, w))
            p = out.reshape(b, m.shape[0], -1)[rows, :, c.t]          # (b, chunk)
            sal += p @ m.reshape(m.shape[0], -1)
        return (sal / (n * 0.5)).reshape(b, 1, h, w).expand(b, ch, h, w)
    return run


def fx_gradient(c):
    return fxattr.gradient(c.f)


def fx_ig(c, chunk=None):
    chunk = c.args.ig_chunk if chunk is None else chunk
    return fxattr.integrated_gradients(c.f, steps=c.args.steps, method=c.args.ig_method,
                                       chunk_size=None if chunk == 0 else chunk)


def fx_smoothgrad(c, chunk=None):
    chunk = c.args.sg_chunk if chunk is None else chunk
    std = 0.15 * float(c.x.max() - c.x.min())  # captum's stdevs is absolute: the same noise level
    return fxattr.smoothgrad(c.f, samples=c.args.samples, sigma=std, relative=False,
                             chunk_size=None if chunk == 0 else chunk)


def fx_lrp_epf(c):
    return fxattr.lrp(c.f, composite="epsilon_plus_flat")


def fx_lrp_a2b1(c):
    try:
        return fxattr.lrp(c.f, composite="epsilon_alpha2_beta1")
    except (ValueError, TypeError):
        return fxattr.lrp(c.f, rule="alpha_2_beta_1")


def fx_gradcam(c):
    return fxattr.gradcam(c.f, layer=c.layer_name)


def fx_deeplift(c):
    return fxattr.deeplift(c.f)


def fx_occlusion(c):
    w, s = occlusion_geometry(c)
    ch = c.x.shape[1]
    return fxattr.occlusion(c.f, window=(ch, w, w), stride=(ch, s, s), chunk_size=c.args.mask_chunk)


def fx_rise(c):
    return fxattr.rise(c.f, masks=bench_rise_masks(c), p=0.5, chunk_size=c.args.mask_chunk)


def fx_scorecam(c):
    # pytorch-grad-cam runs batch_size masks of ONE image per forward; fxattr's chunk is per example
    # inside the outer vmap (chunk x batch rows), so match rows per forward, not chunk numbers.
    return fxattr.scorecam(c.f, layer=c.layer_name, chunk_size=max(1, c.args.mask_chunk // c.x.shape[0]))


# name: (fxattr attribute it needs, fxattr factory, vmap randomness, [(peer name, factory)],
#        whether fxattr and the first peer compute the same numbers, target: a ratio to the floor,
#        the name of the argument that gives it, or ("peer", ratio to the fastest peer))
METHODS = OrderedDict([
    ("gradient", ("gradient", fx_gradient, "error", [("captum Saliency", captum_saliency)], True, 1.05)),
    ("ig", ("integrated_gradients", fx_ig, "error", [("captum IntegratedGradients", captum_ig)], True, "steps")),
    ("smoothgrad", ("smoothgrad", fx_smoothgrad, "different",
                    [("captum NoiseTunnel(Saliency)", captum_smoothgrad)], False, "samples")),
    ("lrp_epsilon_plus_flat", ("lrp", fx_lrp_epf, "error",
                               [("zennit EpsilonPlusFlat", zennit_epsilon_plus_flat)], False, 2.0)),
    ("lrp_epsilon_alpha2_beta1", ("lrp", fx_lrp_a2b1, "error",
                                  [("zennit EpsilonAlpha2Beta1", zennit_epsilon_alpha2_beta1)], False, 2.0)),
    ("gradcam", ("gradcam", fx_gradcam, "error", [("captum LayerGradCam", captum_layer_gradcam),
                                                  ("pytorch-grad-cam GradCAM", gradcam_lib_gradcam)], False, 1.1)),
    ("deeplift", ("deeplift", fx_deeplift, "error", [("captum DeepLift", captum_deeplift)], False, None)),
    ("occlusion", ("occlusion", fx_occlusion, "error", [("captum Occlusion", captum_occlusion)], True, ("peer", 0.5))),
    ("rise", ("rise", fx_rise, "error", [("torch loop (RISE reference)", torch_rise)], True, ("peer", 0.5))),
    ("scorecam", ("scorecam", fx_scorecam, "error", [("pytorch-grad-cam ScoreCAM", gradcam_lib_scorecam)],
                  False, ("peer", 0.5))),
])


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


# ------------------------------------------------------------------------------------ report

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


# -------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet18,vgg11,small_cnn")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {', '.join(METHODS)}")
    p.add_argument("--device", default="cpu", help="cpu, cuda, or auto (cuda when present)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: see OMP_WAIT_POLICY above; 2 cores shared here)")
    p.add_argument("--steps", type=int, default=32, help="IG steps")
    p.add_argument("--ig-method", default="gausslegendre")
    p.add_argument("--ig-chunk", type=int, default=4, help="fxattr IG chunk_size (0 = None, all steps)")
    p.add_argument("--samples", type=int, default=16, help="smoothgrad samples")
    p.add_argument("--sg-chunk", type=int, default=4, help="fxattr smoothgrad chunk_size (0 = None)")
    p.add_argument("--occlusion-window", type=int, default=None, help="default size/4")
    p.add_argument("--occlusion-stride", type=int, default=None, help="default = window")
    p.add_argument("--rise-masks", type=int, default=None,
                   help="fixed RISE masks (default 32 on CPU, 1000 on CUDA)")
    p.add_argument("--force", action="store_true",
                   help="run ScoreCAM on the torchvision models on CPU too (hours on 2 cores)")
    p.add_argument("--mask-chunk", type=int, default=16,
                   help="masks/windows per forward for the perturbation peers")
    p.add_argument("--block-budget", type=float, default=1200.0,
                   help="seconds of timed repeats per (model, method) block; fewer repeats past it")
    p.add_argument("--heavy-s", type=float, default=60.0,
                   help="blocks whose warm-ups take longer count the warm-up call as a sample")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-methods", default=None,
                   help="compile only these methods (IG's unrolled chunks compiled for 20+ min here)")
    p.add_argument("--compile-models", default=None,
                   help="compile only for these models (compiling resnet18 took ~8 min on the shared CPU)")
    p.add_argument("--quick", action="store_true", help="small images, batch 2, 2 repeats: a smoke test")
    p.add_argument("--sweep-chunks", action="store_true", help="also sweep IG / smoothgrad chunk_size")
    p.add_argument("--sweep-only", action="store_true", help="only the chunk sweep")
    p.add_argument("--sweep-compiled", action="store_true", help="sweep compiled variants too")
    p.add_argument("--ig-chunks", default="0,2,4,8,16")
    p.add_argument("--sg-chunks", default="0,4,8")
    p.add_argument("--out", default=None, help="markdown path (default bench/results/<device>.md)")
    p.add_argument("--clock", default=None, choices=("wall", "process"),
                   help="wall time, or process CPU time (default on CPU: robust to other processes)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.size = min(args.size, 64)
        args.batch = min(args.batch, 2)
        args.repeats = min(args.repeats, 2)
    args.ig_chunks = [int(v) for v in args.ig_chunks.split(",")]
    args.sg_chunks = [int(v) for v in args.sg_chunks.split(",")]
    args.sweep_chunks = args.sweep_chunks or args.sweep_only
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.clock is None:
        args.clock = "process" if device.type == "cpu" and args.threads == 1 else "wall"
    CLOCK["fn"] = time.process_time if args.clock == "process" else time.perf_counter
    if args.rise_masks is None:
        args.rise_masks = 1000 if device.type == "cuda" else 32
    torch._dynamo.config.cache_size_limit = 64
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    # vmap's "performance drop ... batching rule" warnings name the ops that fall back to a loop.
    for name in ("_set_vmap_fallback_warning_enabled", "_set_vmap_fallback_warn_enabled"):
        if hasattr(torch._C._functorch, name):
            getattr(torch._C._functorch, name)(True)
            break
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    rows, sweep_rows, extra = [], [], []
    out_path = args.out or os.path.join(HERE, "results", f"{device.type}{'-quick' if args.quick else ''}.md")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
          f"batch {args.batch}, size {args.size}, repeats {args.repeats}", flush=True)
    for model_name in args.models.split(","):
        model = build_model(model_name).to(device)
        frozen = frozen_copy(model)
        f, params = fxattr.functionalize(model, input_shape=(3, args.size, args.size))
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
        with torch.no_grad():
            t = frozen(x).argmax(1)
        # Different targets per example so that a per-example target matters.
        t = (t + torch.arange(args.batch, device=device)) % frozen(x[:1]).shape[1]

        def floor(model=frozen, x=x, t=t):
            xr = x.detach().requires_grad_(True)
            out = model(xr)
            return torch.autograd.grad(out.gather(1, t[:, None]).sum(), xr)[0]

        def floor_params_grad(model=model, x=x, t=t):
            xr = x.detach().requires_grad_(True)
            out = model(xr)
            return torch.autograd.grad(out.gather(1, t[:, None]).sum(), xr)[0]

        timed(floor, device)
        timed(floor_params_grad, device)
        a, b = [], []
        for _ in range(args.repeats):
            a.append(timed(floor, device)[0])
            b.append(timed(floor_params_grad, device)[0])
        extra.append(f"{model_name}: floor {fmt_s(statistics.median(a))} (parameters frozen), "
                     f"{fmt_s(statistics.median(b))} with parameters requiring grad")
        print(f"{model_name}: floor {fmt_s(statistics.median(a))}, params requiring grad "
              f"{fmt_s(statistics.median(b))}", flush=True)
        c = Ctx(model_name, model, frozen, f, params, x, t, args)
        if not args.sweep_only:
            for method in methods:
                try:
                    run_block(rows, model_name, method, c, floor, args, device)
                except Exception:  # noqa: BLE001 - keep the other rows
                    traceback.print_exc()
                with open(out_path, "w") as fh:
                    fh.write(markdown(rows, sweep_rows, extra, args, device))
        if args.sweep_chunks:
            sweep_chunks(sweep_rows, model_name, c, floor, args, device)
        with open(out_path, "w") as fh:
            fh.write(markdown(rows, sweep_rows, extra, args, device))
        del c, model, frozen, f, params
        torch._dynamo.reset()
        gc.collect()
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
