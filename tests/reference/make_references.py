"""Regenerates the iNNvestigate reference attributions in this folder (``<network>.npz``).

Runs iNNvestigate 2.1.2 itself (TensorFlow 2.14, Keras 2.14 graph mode) on four small networks
defined below -- a dense MLP, a CNN with max pooling, a CNN with average pooling and a residual
CNN with an ``Add`` -- with non-zero random biases and signed inputs, for every analyzer in
``ANALYZERS`` and every neuron selection mode in ``MODES``, and saves one npz per network.
TensorFlow is NOT a dependency of fxattr: run this in a separate virtual environment::

    python3.11 -m venv /tmp/innv-venv
    /tmp/innv-venv/bin/pip install "tensorflow-cpu==2.14.*" innvestigate==2.1.2
    /tmp/innv-venv/bin/python tests/reference/make_references.py

Everything is computed in float64 (``keras.backend.set_floatx("float64")``) so that the torch side
can be compared at rtol 1e-4 without float32 noise; the attributions are stored as float32. The layout of the files is described in
README.md next to this script.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
import sys
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.compat.v1.disable_eager_execution()  # iNNvestigate 2.x builds TF1-style graphs
tf.config.threading.set_intra_op_parallelism_threads(1)  # tiny graphs: threads only contend
tf.config.threading.set_inter_op_parallelism_threads(1)
tf.keras.backend.set_floatx("float64")

import innvestigate  # noqa: E402
import innvestigate.analyzer.relevance_based.relevance_rule as rrule  # noqa: E402
import innvestigate.layers as ilayers  # noqa: E402
from innvestigate.analyzer import LRP, LRPEpsilon  # noqa: E402

klayers = tf.keras.layers

HERE = Path(__file__).resolve().parent
SEED = 20261123
N = 4              # examples per network
CLASSES = 5
SMOOTHGRAD_N = 16  # augment_by_n for smoothgrad (its noise is recorded, see _record_noise)
LOW, HIGH = -1.0, 1.0  # inputs are drawn in [LOW, HIGH); the bounded rules use these bounds
MODES = ("max_activation", "index", "all")
INDEX = np.array([0, 3, 1, 4])  # neuron_selection in mode "index": one output index per example


# --------------------------------------------------------------------------------------------
# Networks. Each is a list of layer specs (a tiny, explicit description that the torch side
# rebuilds); ``inputs`` names the layers feeding a layer (default: the previous one).
# --------------------------------------------------------------------------------------------

def _conv(name, filters, padding="same", activation="relu", inputs=None):
    return dict(name=name, type="Conv2D", filters=filters, kernel_size=[3, 3], strides=[1, 1],
                padding=padding, activation=activation, inputs=inputs)


def _dense(name, units, activation="relu"):
    return dict(name=name, type="Dense", units=units, activation=activation, inputs=None)


NETWORKS = {
    "mlp": dict(input_shape=[10], layers=[
        _dense("dense1", 16),
        _dense("dense2", 12),
        _dense("out", CLASSES, activation="linear"),
    ]),
    "cnn_max": dict(input_shape=[8, 8, 3], layers=[
        _conv("conv1", 6),
        dict(name="pool1", type="MaxPooling2D", pool_size=[2, 2], inputs=None),
        _conv("conv2", 8, padding="valid"),
        dict(name="flatten", type="Flatten", inputs=None),
        _dense("dense1", 16),
        _dense("out", CLASSES, activation="linear"),
    ]),
    "cnn_avg": dict(input_shape=[8, 8, 3], layers=[
        _conv("conv1", 6),
        dict(name="pool1", type="AveragePooling2D", pool_size=[2, 2], inputs=None),
        _conv("conv2", 8, padding="valid"),
        dict(name="flatten", type="Flatten", inputs=None),
        _dense("dense1", 16),
        _dense("out", CLASSES, activation="linear"),
    ]),
    "resnet": dict(input_shape=[8, 8, 3], layers=[
        _conv("conv1", 6),
        _conv("block_conv1", 6),
        _conv("block_conv2", 6, activation="linear"),
        dict(name="residual_add", type="Add", inputs=["block_conv2", "conv1"]),
        dict(name="relu", type="Activation", activation="relu", inputs=None),
        dict(name="pool", type="MaxPooling2D", pool_size=[2, 2], inputs=None),
        dict(name="flatten", type="Flatten", inputs=None),
        _dense("out", CLASSES, activation="linear"),
    ]),
}


def build_keras(spec, rng=None, weights=None):
    """The Keras model of ``spec``: with random weights drawn from ``rng`` (kernels ~ N(0, 1/fan_in),
    biases ~ N(0, 0.3)), or with the given ``weights`` (``{"w/<layer>/kernel": ..., ...}``)."""
    inp = klayers.Input(shape=tuple(spec["input_shape"]), name="input")
    tensors = {"input": inp}
    previous = "input"
    for layer_spec in spec["layers"]:
        kind, name = layer_spec["type"], layer_spec["name"]
        sources = layer_spec["inputs"] or [previous]
        x = [tensors[s] for s in sources]
        if kind == "Conv2D":
            layer = klayers.Conv2D(layer_spec["filters"], tuple(layer_spec["kernel_size"]),
                                   strides=tuple(layer_spec["strides"]), padding=layer_spec["padding"],
                                   activation=layer_spec["activation"], name=name)
        elif kind == "Dense":
            layer = klayers.Dense(layer_spec["units"], activation=layer_spec["activation"], name=name)
        elif kind == "MaxPooling2D":
            layer = klayers.MaxPooling2D(tuple(layer_spec["pool_size"]), name=name)
        elif kind == "AveragePooling2D":
            layer = klayers.AveragePooling2D(tuple(layer_spec["pool_size"]), name=name)
        elif kind == "Flatten":
            layer = klayers.Flatten(name=name)
        elif kind == "Add":
            layer = klayers.Add(name=name)
        elif kind == "Activation":
            layer = klayers.Activation(layer_spec["activation"], name=name)
        else:
            raise ValueError(kind)
        tensors[name] = layer(x if kind == "Add" else x[0])
        previous = name
    model = tf.keras.Model(inp, tensors[previous], name="net")
    drawn = {}
    for layer in model.layers:
        if not layer.weights:
            continue
        if weights is None:
            kernel, bias = layer.get_weights()
            fan_in = int(np.prod(kernel.shape[:-1]))
            kernel = rng.normal(0.0, 1.0 / np.sqrt(fan_in), size=kernel.shape)
            bias = rng.normal(0.0, 0.3, size=bias.shape)
        else:
            kernel, bias = weights[f"w/{layer.name}/kernel"], weights[f"w/{layer.name}/bias"]
        layer.set_weights([kernel, bias])
        drawn[f"w/{layer.name}/kernel"] = kernel
        drawn[f"w/{layer.name}/bias"] = bias
    return model, drawn


# --------------------------------------------------------------------------------------------
# Analyzers: label -> (iNNvestigate name or a factory, kwargs). The label is the npz key
# prefix; ``name`` and ``kwargs`` are what fxattr.create_analyzer is called with.
# --------------------------------------------------------------------------------------------

class _ZIgnoreBias(rrule.ZRule):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, bias=False, **kwargs)


def _lrp_z_ib(model, **kwargs):
    # iNNvestigate 1.x's "lrp.z_IB" (LRPZIgnoreBias) is gone from 2.x; its rule is ZRule(bias=False).
    return LRP(model, rule=_ZIgnoreBias, bn_layer_rule=_ZIgnoreBias, **kwargs)


def _lrp_epsilon_ib(model, **kwargs):
    # 1.x's "lrp.epsilon_IB"; 2.x keeps it as LRPEpsilon(bias=False).
    return LRPEpsilon(model, bias=False, **kwargs)


ANALYZERS = [
    # label, fxattr/iNNvestigate name, kwargs, factory (None: innvestigate.create_analyzer)
    ("input", "input", {}, None),
    ("gradient", "gradient", {}, None),
    ("gradient.baseline", "gradient.baseline", {}, None),
    ("input_t_gradient", "input_t_gradient", {}, None),
    ("integrated_gradients", "integrated_gradients", {}, None),  # steps=64 (its default)
    ("smoothgrad", "smoothgrad", {"augment_by_n": SMOOTHGRAD_N}, None),
    ("deconvnet", "deconvnet", {}, None),
    ("guided_backprop", "guided_backprop", {}, None),
    ("lrp.z", "lrp.z", {}, None),
    ("lrp.z_IB", "lrp.z_IB", {}, _lrp_z_ib),
    ("lrp.epsilon", "lrp.epsilon", {}, None),  # epsilon=1e-7 (its default)
    ("lrp.epsilon(epsilon=0.25)", "lrp.epsilon", {"epsilon": 0.25}, None),
    ("lrp.epsilon_IB", "lrp.epsilon_IB", {}, _lrp_epsilon_ib),
    ("lrp.w_square", "lrp.w_square", {}, None),
    ("lrp.flat", "lrp.flat", {}, None),
    ("lrp.alpha_beta(alpha=3,beta=2)", "lrp.alpha_beta", {"alpha": 3, "beta": 2}, None),
    ("lrp.alpha_2_beta_1", "lrp.alpha_2_beta_1", {}, None),
    ("lrp.alpha_2_beta_1_IB", "lrp.alpha_2_beta_1_IB", {}, None),
    ("lrp.alpha_1_beta_0", "lrp.alpha_1_beta_0", {}, None),
    ("lrp.alpha_1_beta_0_IB", "lrp.alpha_1_beta_0_IB", {}, None),
    ("lrp.z_plus", "lrp.z_plus", {}, None),
    ("lrp.z_plus_fast", "lrp.z_plus_fast", {}, None),
    ("lrp.sequential_preset_a", "lrp.sequential_preset_a", {}, None),
    ("lrp.sequential_preset_b", "lrp.sequential_preset_b", {}, None),
    ("lrp.sequential_preset_a_flat", "lrp.sequential_preset_a_flat", {}, None),
    ("lrp.sequential_preset_b_flat", "lrp.sequential_preset_b_flat", {}, None),
    ("lrp.sequential_preset_b_flat_until_idx(until_layer_idx=2)",
     "lrp.sequential_preset_b_flat_until_idx", {"until_layer_idx": 2}, None),
    ("deep_taylor", "deep_taylor", {}, None),
    ("deep_taylor.bounded", "deep_taylor.bounded", {"low": LOW, "high": HIGH}, None),
    ("lrp.z(input_layer_rule=Flat)", "lrp.z", {"input_layer_rule": "Flat"}, None),
    ("lrp.z(input_layer_rule=bounds)", "lrp.z", {"input_layer_rule": (LOW, HIGH)}, None),
]


def _record_noise(noise):
    """Makes iNNvestigate's AddGaussianNoise add the given array instead of a fresh draw.

    GaussianSmoother repeats x to (N, augment_by_n, *x.shape), adds standard-normal noise (its
    ``noise_scale`` is accepted and ignored: the layer's stddev stays 1) and moves the copies to
    the batch axis; a constant of that shape replays exactly.
    """
    def call(self, inputs, *args, **kwargs):
        return inputs + tf.constant(noise, dtype=inputs.dtype)
    ilayers.AddGaussianNoise.call = call


def make(network: str, spec: dict, rng: np.random.Generator) -> dict:
    tf.keras.backend.clear_session()
    model, weights = build_keras(spec, rng)
    x = rng.uniform(LOW, HIGH, size=(N, *spec["input_shape"]))
    outputs = model.predict(x, verbose=0)
    noise = rng.standard_normal(size=(N, SMOOTHGRAD_N, *spec["input_shape"]))
    _record_noise(noise)
    arrays = {"x": x, "outputs": outputs, "index": INDEX, "smoothgrad_noise": noise, **weights}
    for label, name, kwargs, factory in ANALYZERS:
        # Every analyzer adds its reverse graph to the one TF1 graph, and building gets slower with
        # each; a fresh session and a rebuilt model (same weights) per analyzer keeps it linear.
        tf.keras.backend.clear_session()
        model, _ = build_keras(spec, weights=weights)
        print(f"  {network} {label}", file=sys.stderr, flush=True)
        for mode in MODES:
            if factory is None:
                analyzer = innvestigate.create_analyzer(name, model, neuron_selection_mode=mode, **kwargs)
            else:
                analyzer = factory(model, neuron_selection_mode=mode, **kwargs)
            if mode == "index":
                a = analyzer.analyze(x, neuron_selection=INDEX)
            else:
                a = analyzer.analyze(x)
            a = np.asarray(a)
            assert a.shape == x.shape, (label, mode, a.shape)
            assert np.isfinite(a).all(), (label, mode)
            # float32 halves the files; its rounding (6e-8 relative) is far below the tests' rtol 1e-4
            arrays[f"{label}__{mode}"] = a.astype(np.float32)
    description = {
        "network": network,
        "input_shape": spec["input_shape"],
        "layers": spec["layers"],
        "layout": "Keras: inputs NHWC, Conv2D kernels HWIO, Dense kernels (in, out), Flatten in NHWC order",
        "dtype": "float64 (computed in); attributions stored as float32",
        "modes": list(MODES),
        "index": INDEX.tolist(),
        "analyzers": [dict(label=label, name=name, kwargs=kwargs) for label, name, kwargs, _ in ANALYZERS],
        "smoothgrad": {"augment_by_n": SMOOTHGRAD_N, "noise": "smoothgrad_noise (N, augment_by_n, *x.shape), "
                       "standard normal, added unscaled (iNNvestigate ignores noise_scale)"},
        "versions": {"innvestigate": metadata.version("innvestigate"),
                     "tensorflow": tf.__version__, "numpy": np.__version__, "python": sys.version.split()[0]},
        "seed": SEED,
    }
    arrays["description"] = np.array(json.dumps(description))
    return arrays


def main() -> None:
    only = sys.argv[1:]  # network names; default: all
    for number, (network, spec) in enumerate(NETWORKS.items()):
        if only and network not in only:
            continue
        rng = np.random.default_rng([SEED, number])  # one stream per network: each regenerates alone
        arrays = make(network, spec, rng)
        path = HERE / f"{network}.npz"
        np.savez_compressed(path, **arrays)
        print(f"{path.name}: {len(arrays)} arrays, {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
