"""ONNX graphs built by hand with onnx.helper: op patterns no PyTorch
exporter writes (Conv without bias then Mul/Add instead of BatchNorm, MatMul
with a transposed weight, Gemm with transB=0, constant reshape targets and
split sizes inside attention, Shape -> Gather -> Concat chains)."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(0)


def f32(name, shape, scale=0.5):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def i64(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def model(nodes, inputs, outputs, inits, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "handbuilt", inputs, outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def conv_net() -> onnx.ModelProto:
    """Conv(no bias) -> Mul/Add affine -> Relu; residual add; concat; channel
    slice with constant bounds; depthwise conv; global pool; Gemm(transB=1)."""
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "c1.w"], ["c1"], pads=[1, 1, 1, 1], name="c1"),
        n("Mul", ["c1", "s1"], ["m1"], name="scale1"),
        n("Add", ["m1", "b1"], ["a1"], name="shift1"),
        n("Relu", ["a1"], ["r1"], name="relu1"),
        n("Conv", ["r1", "c2.w", "c2.b"], ["c2"], pads=[1, 1, 1, 1], name="c2"),
        n("Add", ["c2", "r1"], ["res"], name="residual"),
        n("Relu", ["res"], ["r2"], name="relu2"),
        n("Conv", ["r2", "c3.w", "c3.b"], ["c3"], name="c3"),
        n("Concat", ["r2", "c3"], ["cat"], axis=1, name="cat"),
        n("Slice", ["cat", "sl.starts", "sl.ends", "sl.axes"], ["sl"], name="slice"),
        n("Conv", ["sl", "dw.w", "dw.b"], ["dw"], group=12, pads=[1, 1, 1, 1], name="dw"),
        n("Relu", ["dw"], ["r3"], name="relu3"),
        n("GlobalAveragePool", ["r3"], ["gap"], name="gap"),
        n("Flatten", ["gap"], ["flat"], name="flat"),
        n("Gemm", ["flat", "fc.w", "fc.b"], ["y"], transB=1, name="fc"),
    ]
    inits = [f32("c1.w", (8, 3, 3, 3)), f32("s1", (8, 1, 1)), f32("b1", (8, 1, 1)),
             f32("c2.w", (8, 8, 3, 3), 0.2), f32("c2.b", (8,)), f32("c3.w", (6, 8, 1, 1)), f32("c3.b", (6,)),
             i64("sl.starts", [0]), i64("sl.ends", [12]), i64("sl.axes", [1]),
             f32("dw.w", (12, 1, 3, 3)), f32("dw.b", (12,)), f32("fc.w", (10, 12)), f32("fc.b", (10,))]
    return model(nodes, [vi("x", ["N", 3, 16, 16])], [vi("y", ["N", 10])], inits)


def mlp() -> onnx.ModelProto:
    """MatMul + Add bias; Gemm with transB=0; MatMul with a transposed weight."""
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        n("Add", ["h1", "b1"], ["h1b"], name="fc1.bias"),
        n("Relu", ["h1b"], ["a1"], name="act1"),
        n("Gemm", ["a1", "w2", "b2"], ["h2"], transB=0, name="fc2"),
        n("Sigmoid", ["h2"], ["a2"], name="act2"),
        n("Transpose", ["w3"], ["w3t"], perm=[1, 0], name="w3.T"),
        n("MatMul", ["a2", "w3t"], ["h3"], name="fc3"),
        n("Add", ["h3", "b3"], ["h3b"], name="fc3.bias"),
        n("Tanh", ["h3b"], ["a3"], name="act3"),
        n("Gemm", ["a3", "w4", "b4"], ["y"], transB=1, name="fc4"),
    ]
    inits = [f32("w1", (16, 32)), f32("b1", (32,)), f32("w2", (32, 24)), f32("b2", (24,)),
             f32("w3", (20, 24)), f32("b3", (20,)), f32("w4", (5, 20)), f32("b4", (5,))]
    return model(nodes, [vi("x", ["N", 16])], [vi("y", ["N", 5])], inits)


def transformer_block(tokens=6, embed=16, heads=2, computed_scale=False) -> onnx.ModelProto:
    """Attention with packed qkv, Split with constant sizes, constant reshape
    targets, Softmax, a Shape -> Gather -> Concat reshape target, residuals,
    LayerNormalization, MLP.  ``computed_scale``: the softmax scale is
    ``1/sqrt(q.shape[-1])`` computed in the graph, as TorchScript exports do."""
    d = embed // heads
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "wqkv"], ["qkv0"], name="qkv"),
        n("Add", ["qkv0", "bqkv"], ["qkv"], name="qkv.bias"),
        n("Split", ["qkv", "split"], ["q", "k", "v"], axis=2, name="split"),
        n("Reshape", ["q", "heads_q"], ["q4"], name="q.view"),
        n("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3], name="q.t"),
        n("Reshape", ["k", "heads_k"], ["k4"], name="k.view"),
        n("Transpose", ["k4"], ["kh"], perm=[0, 2, 3, 1], name="k.t"),
        n("Reshape", ["v", "heads_v"], ["v4"], name="v.view"),
        n("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3], name="v.t"),
        n("MatMul", ["qh", "kh"], ["s0"], name="scores"),
        n("Mul", ["s0", "scale_t" if computed_scale else "scale"], ["s"], name="scale"),
        n("Softmax", ["s"], ["p"], axis=-1, name="softmax"),
        n("MatMul", ["p", "vh"], ["o4"], name="context"),
        n("Transpose", ["o4"], ["o3"], perm=[0, 2, 1, 3], name="o.t"),
        n("Shape", ["x"], ["xs"], name="shape"),
        n("Gather", ["xs", "idx01"], ["bn"], axis=0, name="take_bn"),
        n("Concat", ["bn", "width"], ["oshape"], axis=0, name="oshape"),
        n("Reshape", ["o3", "oshape"], ["o"], name="o.view"),
        n("MatMul", ["o", "wo"], ["proj0"], name="proj"),
        n("Add", ["proj0", "bo"], ["proj"], name="proj.bias"),
        n("Add", ["x", "proj"], ["r1"], name="residual1"),
        n("LayerNormalization", ["r1", "ln.w", "ln.b"], ["ln"], axis=-1, name="ln"),
        n("MatMul", ["ln", "w1"], ["m0"], name="mlp1"),
        n("Add", ["m0", "b1"], ["m1"], name="mlp1.bias"),
        n("Relu", ["m1"], ["m2"], name="mlp.act"),
        n("MatMul", ["m2", "w2"], ["m3"], name="mlp2"),
        n("Add", ["m3", "b2"], ["m4"], name="mlp2.bias"),
        n("Add", ["r1", "m4"], ["y"], name="residual2"),
    ]
    if computed_scale:
        nodes[10:10] = [n("Shape", ["qh"], ["qs"], name="q.shape"),
                        n("Gather", ["qs", "last"], ["qd"], axis=0, name="q.head_dim"),
                        n("Cast", ["qd"], ["qdf"], to=TensorProto.FLOAT, name="q.head_dim.float"),
                        n("Sqrt", ["qdf"], ["qsq"], name="sqrt"),
                        n("Reciprocal", ["qsq"], ["scale_t"], name="inv")]
    inits = [i64("last", -1)] if computed_scale else []
    inits += [f32("wqkv", (embed, 3 * embed)), f32("bqkv", (3 * embed,)), i64("split", [embed] * 3),
             i64("heads_q", [1, tokens, heads, d]), i64("heads_k", [1, tokens, heads, d]),
             i64("heads_v", [1, tokens, heads, d]), numpy_helper.from_array(np.float32(d ** -0.5), "scale"),
             i64("idx01", [0, 1]), i64("width", [embed]), f32("wo", (embed, embed)), f32("bo", (embed,)),
             f32("ln.w", (embed,)), f32("ln.b", (embed,)), f32("w1", (embed, 2 * embed)), f32("b1", (2 * embed,)),
             f32("w2", (2 * embed, embed)), f32("b2", (embed,))]
    return model(nodes, [vi("x", [1, tokens, embed])], [vi("y", [1, tokens, embed])], inits)
