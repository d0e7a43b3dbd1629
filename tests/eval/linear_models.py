"""Random linear 'networks' (fc1 = W x + b on the raw pixels) saved as a legacy MXNet checkpoint or as ONNX,
so that an evaluation run can be re-computed exactly in NumPy."""
import numpy as np


def linear_weights(input_shape, dim=8, seed=0):
    """float32 (W (dim, prod(input_shape)), b (dim,)), scaled so that 0..255 pixels give moderate outputs."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(dim, int(np.prod(input_shape)))).astype(np.float32) / np.sqrt(np.prod(input_shape))
    return weight / 30, rng.normal(size=dim).astype(np.float32)


def save_linear_checkpoint(prefix, weight, bias, epoch=1):
    """PREFIX-symbol.json + PREFIX-%04d.params of data -> Flatten -> FullyConnected 'fc1'."""
    import mxnet as mx
    symbol = mx.sym.FullyConnected(mx.sym.Flatten(mx.sym.Variable("data")), num_hidden=len(bias), name="fc1")
    mx.model.save_checkpoint(prefix, epoch, symbol, {"fc1_weight": mx.nd.array(weight),
                                                     "fc1_bias": mx.nd.array(bias)}, {})


def save_linear_onnx(path, weight, bias, input_shape):
    """The same network as an ONNX model: input 'data' (batch, 3, H, W), output 'fc1_output' (batch, D)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["data"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "fc1_weight", "fc1_bias"], ["fc1_output"], transB=1)],
        "linear", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["batch"] + list(input_shape))],
        [helper.make_tensor_value_info("fc1_output", TensorProto.FLOAT, ["batch", len(bias)])],
        initializer=[numpy_helper.from_array(weight, "fc1_weight"), numpy_helper.from_array(bias, "fc1_bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
