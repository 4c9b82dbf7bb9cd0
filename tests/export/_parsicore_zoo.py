"""A parsicore model holding every op of the table at least once, for the ONNX export and torch runner tests.

Shapes are small (input 3x12x12) so a numpy-backend run takes milliseconds. ``zoo_model(seed)`` varies the
weights only; the structure is fixed so each op's attributes that differ from the defaults are exercised:
asymmetric conv pads, stride, dilation, groups; pools with pads, ceil_mode, count_include_pad; Add/Mul with a
constant and with a broadcast tensor; Pad with a value; Reshape; Concat; Softmax; both gate kinds on a
(C, H, W) input and a TopKGate on an (F,) vector gating a Gemm output through ChannelMask.
"""

from __future__ import annotations

import numpy as np

from parsicore.builder import ModelBuilder
from parsicore.format import ModelFile
from tests.models import _w, bn_weights


def zoo_model(seed: int = 0) -> ModelFile:
    rng = np.random.default_rng(seed)
    b = ModelBuilder("zoo", license="MIT", producer="tests/export/_parsicore_zoo.py")
    b.add_input("x", (None, 3, 12, 12))
    b.add_node("Conv", ["x"], ["c1"], name="conv_asym", attrs={"pads": (1, 0, 2, 1), "stride": (1, 2)},
               weights={"weight": _w(rng, 8, 3, 3, 3), "bias": _w(rng, 8, scale=0.1)})
    b.add_node("BatchNorm", ["c1"], ["b1"], name="bn", weights=bn_weights(rng, 8))
    b.add_node("LeakyRelu", ["b1"], ["a1"], name="leaky", attrs={"alpha": 0.1})
    b.add_node("Conv", ["a1"], ["c2"], name="conv_grouped", attrs={"pads": (2, 2, 2, 2), "dilation": (2, 2),
                                                                    "groups": 2},
               weights={"weight": _w(rng, 8, 4, 3, 3)})
    b.add_node("HardSwish", ["c2"], ["a2"], name="hswish")
    b.add_node("Silu", ["a1"], ["s1"], name="silu")
    b.add_node("Add", ["a2", "s1"], ["sum"], name="add2")
    b.add_node("Tanh", ["sum"], ["t1"], name="tanh")
    b.add_node("HardSigmoid", ["sum"], ["h1"], name="hsig", attrs={"alpha": 1 / 6, "beta": 0.5})
    b.add_node("Concat", ["t1", "h1"], ["cat"], name="concat", attrs={"axis": 1})
    b.add_node("Mul", ["cat"], ["scaled"], name="mul_const", weights={"constant": _w(rng, 16, 1, 1, scale=1.0)})
    b.add_node("Add", ["scaled"], ["shifted"], name="add_const", weights={"constant": np.array([0.25])})
    b.add_node("Pad", ["shifted"], ["padded"], name="pad", attrs={"pads": (0, 1, 1, 0), "value": 0.5})
    b.add_node("AveragePool", ["padded"], ["ap"], name="avgpool",
               attrs={"kernel": (3, 3), "stride": (2, 2), "pads": (1, 1, 1, 1), "ceil_mode": True,
                      "count_include_pad": True})
    b.add_node("GlobalAveragePool", ["ap"], ["se_in"], name="se_pool")
    b.add_node("Sigmoid", ["se_in"], ["se"], name="se_sigmoid")
    b.add_node("Mul", ["ap", "se"], ["ap_se"], name="se_mul")
    b.add_node("Clip", ["ap_se"], ["clipped"], name="clip", attrs={"lo": -0.5, "hi": 1.5})
    # Gated part: an LKAM gate (scaled, 3x3 bank, max pool) and a top-k gate (hard) on 4-D inputs.
    b.add_node("LKAMGate", ["clipped"], ["g1"], name="lkam", attrs={"kernel_size": 3, "pool": "max",
                                                                   "threshold": 0.5, "mode": "scaled"},
               weights={"w1": _w(rng, 12, 16, 3, 3, scale=0.3), "b1": _w(rng, 12, scale=0.5)})
    b.add_node("Conv", ["clipped"], ["c3"], name="conv_gated", attrs={"pads": (1, 1, 1, 1)},
               weights={"weight": _w(rng, 12, 16, 3, 3), "bias": _w(rng, 12, scale=0.1)})
    b.add_node("Relu", ["c3"], ["r3"], name="relu3")
    b.add_node("ChannelMask", ["r3", "g1"], ["m3"], name="mask3")
    b.add_node("MaxPool", ["m3"], ["p3"], name="maxpool", attrs={"kernel": (2, 2), "stride": (1, 1),
                                                                "pads": (0, 0, 1, 1)})
    b.add_node("TopKGate", ["p3"], ["g2"], name="topk", attrs={"keep_ratio": 0.4, "scaled": False, "pool": "max",
                                                               "activation": "none"},
               weights={"weight": _w(rng, 10, 12, scale=1.0), "bias": _w(rng, 10, scale=0.5)})
    b.add_node("Conv", ["p3"], ["c4"], name="conv_1x1", weights={"weight": _w(rng, 10, 12, 1, 1)})
    b.add_node("ChannelMask", ["c4", "g2"], ["m4"], name="mask4")
    b.add_node("GlobalMaxPool", ["m4"], ["gmp"], name="gmp")
    b.add_node("Flatten", ["gmp"], ["flat"], name="flatten")
    b.add_node("Dropout", ["flat"], ["drop"], name="dropout")
    b.add_node("Gemm", ["drop"], ["fc1"], name="fc1", weights={"weight": _w(rng, 12, 10), "bias": _w(rng, 12)})
    b.add_node("BatchNorm", ["fc1"], ["fc1_bn"], name="bn1d", weights=bn_weights(rng, 12))
    # A top-k gate on a vector, gating the next Gemm's output.
    b.add_node("TopKGate", ["fc1_bn"], ["g3"], name="topk_vec", attrs={"keep_ratio": 0.5, "scaled": True},
               weights={"weight": _w(rng, 6, 12, scale=1.0), "bias": _w(rng, 6, scale=0.5) + 0.5})
    b.add_node("Gemm", ["fc1_bn"], ["fc2"], name="fc2", weights={"weight": _w(rng, 6, 12)})
    b.add_node("ChannelMask", ["fc2", "g3"], ["fc2_m"], name="mask_vec")
    b.add_node("Reshape", ["fc2_m"], ["rs"], name="reshape", attrs={"shape": (2, -1)})
    b.add_node("Softmax", ["rs"], ["sm"], name="softmax", attrs={"axis": 2})
    b.add_node("Identity", ["sm"], ["probs"], name="identity")
    b.add_node("Relu", ["fc1_bn"], ["aux"], name="relu_aux")
    b.add_output("probs")
    b.add_output("aux")
    return b.build()
