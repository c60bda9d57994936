"""A torchvision ResNet-18 explained with LRP composites and Grad-CAM, side by side.

The network has random weights (nothing is downloaded) and the pictures are scikit-learn's two
bundled sample photographs, so this shows the mechanics rather than what a trained ResNet looks at:
every method traces the same ``f(params, x)``, runs batched under ``torch.vmap`` and needs no hooks.
Load trained weights (``torchvision.models.resnet18(weights="DEFAULT")``) for meaningful maps.

    python examples/resnet_lrp_gradcam.py            # about a minute on 2 CPU cores
    python examples/resnet_lrp_gradcam.py --quick    # small images (used by the tests)

Writes examples/out/resnet_lrp_gradcam.png; methods missing from this fxattr are skipped.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torchvision
from sklearn.datasets import load_sample_images

import fxattr
from fxattr import viz

OUT = Path(__file__).resolve().parent / "out"
MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).reshape(3, 1, 1)


def load_images(size: int) -> torch.Tensor:
    """scikit-learn's sample photographs (china.jpg, flower.jpg), centre-cropped, resized to
    ``size`` and normalised as for ImageNet: (2, 3, size, size)."""
    pictures = []
    for image in load_sample_images().images:
        t = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1) / 255
        side = min(t.shape[1:])
        top, left = (t.shape[1] - side) // 2, (t.shape[2] - side) // 2
        t = t[:, top:top + side, left:left + side]
        t = torch.nn.functional.interpolate(t[None], size=(size, size), mode="bilinear",
                                            antialias=True, align_corners=False)[0]
        pictures.append((t - MEAN) / STD)
    return torch.stack(pictures)


def methods():
    low, high = (0 - MEAN) / STD, (1 - MEAN) / STD  # the normalised input's bounds, per channel
    return [
        ("Grad-CAM (layer4)", "gradcam", {"layer": "layer4"}),
        ("LRP epsilon_plus_flat", "lrp", {"composite": "epsilon_plus_flat"}),
        ("LRP epsilon_gamma_box", "lrp", {"composite": "epsilon_gamma_box", "low": low, "high": high}),
        ("LRP epsilon_alpha2_beta1_flat", "lrp", {"composite": "epsilon_alpha2_beta1_flat"}),
        ("guided Grad-CAM", "guided_gradcam", {"layer": "layer4"}),
        ("gradient", "gradient", {}),
    ]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="32x32 images (for tests)")
    parser.add_argument("--size", type=int, default=None, help="image size (default 224; 32 quick)")
    parser.add_argument("--out", type=Path, default=OUT / "resnet_lrp_gradcam.png")
    args = parser.parse_args(argv)
    size = args.size or (32 if args.quick else 224)

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    f, params = fxattr.functionalize(model, input_shape=(3, size, size))
    images = load_images(size)
    with torch.no_grad():
        predictions = model(images).argmax(1)
    print(f"ResNet-18 (random weights), {len(images)} images {size}x{size}, explaining the "
          f"predicted classes {predictions.tolist()}")

    columns, pictures, times, skipped = [], [], {}, {}
    for name, attribute, config in methods():
        method = getattr(fxattr, attribute, None)
        if method is None:
            skipped[name] = f"fxattr.{attribute} is not in this version of fxattr"
            continue
        try:
            explain = torch.vmap(method(f, **config), in_dims=(None, 0, 0))
            start = time.perf_counter()
            attribution = explain(params, images, predictions).detach()
            times[name] = time.perf_counter() - start
        except Exception as error:  # noqa: BLE001 - report and go on
            skipped[name] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            continue
        if attribute == "gradcam":  # one (H, W) map broadcast over the channels: lay it over the image
            pictures.append(viz.overlay(images, attribution[:, 0], alpha=0.6, channel_axis=None,
                                        cmap="bwr"))
        else:
            # clip each map's extreme 0.5 % so a few large values do not wash out the rest
            pictures.append([viz.heatmap(viz.clip_quantile(a, 0.5)) for a in attribution])
        columns.append(name)

    for name in columns:
        print(f"  {name:<30} {times[name]:6.2f} s for {len(images)} images")
    for name, reason in skipped.items():
        print(f"  {name:<30} skipped: {reason}")

    shown = (images * STD + MEAN).clamp(0, 1)
    rows = [[shown[i]] + [p[i] for p in pictures] for i in range(len(images))]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viz.plot_grid(rows, row_labels=[f"class {int(c)}" for c in predictions],
                  col_labels=["input", *columns], file=args.out, cell_size=2.2)
    print(f"wrote {args.out}")
    return {"times": times, "skipped": skipped, "out": args.out}


if __name__ == "__main__":
    main()
