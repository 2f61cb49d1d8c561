"""Export to ONNX: the ViT's forward as an ONNX graph built with the `onnx` package (opset 17, IR version 8,
which current onnxruntime releases read), for every family tinyvit runs. Input `pixel_values` (batch, C, S,
S) float32 with a dynamic batch axis, output `logits`; the weights as initializers (in a `.data` file
beside the model past 2 GiB); the position embedding stored for the checkpoint's size, no resize in the
graph; the class names and the eval transform in metadata_props."""
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import TinyViTError
from ..nn.config import ViTConfig
from .files import atomic_write

OPSET, IR_VERSION = 17, 8
EXTERNAL_PAST = 2 ** 31 - 2 ** 24  # protobuf's 2 GiB limit, with room for the graph itself


def _onnx():
    try:
        import onnx
    except ImportError:
        raise TinyViTError("--to onnx needs the onnx package: pip install onnx") from None
    return onnx


class _Graph:
    """Nodes and initializers of one graph, each output named in order (t0, t1, ...)."""

    def __init__(self, onnx, dtype):
        self.onnx, self.dtype, self.nodes, self.inits, self.n = onnx, dtype, [], [], 0

    def const(self, x, name=None, dtype=None):
        """An initializer holding x (in the graph's float dtype unless dtype is given)."""
        name = name or f"c{len(self.inits)}"
        arr = np.array(x, dtype=dtype or self.dtype, order="C")  # (ascontiguousarray would make a 0-d index 1-d)
        self.inits.append(self.onnx.numpy_helper.from_array(arr, name))
        return name

    def ints(self, values):
        return self.const(np.asarray(values, np.int64), dtype=np.int64)

    def op(self, op_type, *inputs, **attrs):
        """One node; its output's name."""
        out = f"t{self.n}"
        self.n += 1
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), [out], **attrs))
        return out


def _linear(g, x, p, name, bias=True):
    """x @ W.T (+ b) for a torch-layout weight (out, in): the transposed weight is stored."""
    y = g.op("MatMul", x, g.const(p[name + ".weight"].T))
    return g.op("Add", y, g.const(p[name + ".bias"])) if bias and name + ".bias" in p else y


def _norm(g, x, p, name, eps):
    return g.op("LayerNormalization", x, g.const(p[name + ".weight"]), g.const(p[name + ".bias"]), axis=-1,
                epsilon=float(eps))


def _gelu(g, x, kind):
    """GELU from opset-17 ops (Gelu itself is opset 20): exact by Erf, torch's tanh form, or QuickGELU."""
    if kind == "quick":
        return g.op("Mul", x, g.op("Sigmoid", g.op("Mul", x, g.const(1.702))))
    if kind == "erf":
        inner = g.op("Erf", g.op("Mul", x, g.const(1 / math.sqrt(2))))
    else:
        cube = g.op("Mul", g.op("Mul", x, x), x)
        u = g.op("Mul", g.op("Add", x, g.op("Mul", cube, g.const(0.044715))), g.const(math.sqrt(2 / math.pi)))
        inner = g.op("Tanh", u)
    return g.op("Mul", g.op("Mul", x, g.op("Add", inner, g.const(1.0))), g.const(0.5))


def _heads_attention(g, q, k, v, C):
    """softmax(q k^T) v per head, q already scaled; (B, H, n, D) -> (B, n, C)."""
    a = g.op("Softmax", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), axis=-1)
    o = g.op("Transpose", g.op("MatMul", a, v), perm=[0, 2, 1, 3])  # (B, n, H, D)
    return g.op("Reshape", o, g.ints([0, 0, C]))


def _block(g, x, p, i, cfg):
    """One pre-norm block over every token."""
    b, C, H = f"blocks.{i}.", cfg.dim, cfg.heads
    D = C // H
    qkv = _linear(g, _norm(g, x, p, b + "norm1", cfg.ln_eps), p, b + "attn.qkv")  # (B, T, 3C)
    qkv = g.op("Transpose", g.op("Reshape", qkv, g.ints([0, 0, 3, H, D])), perm=[2, 0, 3, 1, 4])  # (3, B, H, T, D)
    q, k, v = (g.op("Gather", qkv, g.ints(j), axis=0) for j in range(3))
    h = _linear(g, _heads_attention(g, g.op("Mul", q, g.const(D ** -0.5)), k, v, C), p, b + "attn.proj")
    if b + "ls1.gamma" in p:
        h = g.op("Mul", h, g.const(p[b + "ls1.gamma"]))
    x = g.op("Add", x, h)
    h = _linear(g, _gelu(g, _linear(g, _norm(g, x, p, b + "norm2", cfg.ln_eps), p, b + "mlp.fc1"), cfg.gelu),
                p, b + "mlp.fc2")
    if b + "ls2.gamma" in p:
        h = g.op("Mul", h, g.const(p[b + "ls2.gamma"]))
    return g.op("Add", x, h)


def _embed(g, x, p, cfg):
    """Patch embedding (a strided Conv), the prefix tokens, the position embedding, norm_pre: (B, P+N, C)."""
    C = cfg.dim
    w = p["patch_embed.proj.weight"]
    conv = [x, g.const(w)] + ([g.const(p["patch_embed.proj.bias"])] if "patch_embed.proj.bias" in p else [])
    t = g.op("Conv", *conv, kernel_shape=[cfg.patch_size] * 2, strides=[cfg.patch_size] * 2)
    t = g.op("Transpose", g.op("Reshape", t, g.ints([0, C, -1])), perm=[0, 2, 1])  # (B, N, C)
    batch = g.op("Shape", x, start=0, end=1)
    prefix = []
    for name in ("cls_token", "dist_token", "reg_token"):
        if name in p:
            n = p[name].shape[1]
            prefix.append(g.op("Expand", g.const(p[name]), g.op("Concat", batch, g.ints([n, C]), axis=0)))
    pos = g.const(p["pos_embed"])
    if cfg.no_embed_class:
        t = g.op("Add", t, pos)
    if prefix:
        t = g.op("Concat", *prefix, t, axis=1)
    if not cfg.no_embed_class:
        t = g.op("Add", t, pos)
    return _norm(g, t, p, "norm_pre", cfg.ln_eps) if cfg.pre_norm else t


def _attention_pool(g, x, p, cfg):
    """timm's AttentionPoolLatent: the latent's query is input-independent, so it is computed here."""
    C, H = cfg.dim, cfg.heads
    D = C // H
    q = (p["attn_pool.latent"].astype(np.float64) @ p["attn_pool.q.weight"].T.astype(np.float64)
         + p["attn_pool.q.bias"]).reshape(1, 1, H, D).transpose(0, 2, 1, 3) * D ** -0.5  # (1, H, 1, D)
    kv = _linear(g, x, p, "attn_pool.kv")  # (B, N, 2C)
    kv = g.op("Transpose", g.op("Reshape", kv, g.ints([0, 0, 2, H, D])), perm=[2, 0, 3, 1, 4])  # (2, B, H, N, D)
    k, v = (g.op("Gather", kv, g.ints(j), axis=0) for j in range(2))
    y = _linear(g, _heads_attention(g, g.const(q), k, v, C), p, "attn_pool.proj")  # (B, 1, C)
    m = _linear(g, _gelu(g, _linear(g, _norm(g, y, p, "attn_pool.norm", cfg.ln_eps), p, "attn_pool.mlp.fc1"),
                         cfg.gelu), p, "attn_pool.mlp.fc2")
    return g.op("Gather", g.op("Add", y, m), g.ints(0), axis=1)  # (B, C)


def _pool_and_head(g, x, p, cfg):
    """The final norm, the pooling and the head(s): the logits (B, K)."""
    P = cfg.num_prefix_tokens
    if not cfg.use_fc_norm:
        x = _norm(g, x, p, "norm", cfg.ln_eps)
    patches = g.op("Slice", x, g.ints([P]), g.ints([2 ** 62]), g.ints([1]))  # (B, N, C)
    token = g.op("Gather", x, g.ints(0), axis=1) if cfg.class_token else None  # (B, C)
    if cfg.global_pool == "token":
        f = token
    elif cfg.global_pool == "avg":
        f = g.op("ReduceMean", patches, axes=[1], keepdims=0)
    elif cfg.global_pool == "token_avg":
        f = g.op("Concat", token, g.op("ReduceMean", patches, axes=[1], keepdims=0), axis=1)
    else:
        f = _attention_pool(g, patches, p, cfg)
    if cfg.use_fc_norm:
        f = _norm(g, f, p, "fc_norm", cfg.ln_eps)
    logits = g.op("Gemm", f, g.const(p["head.weight"]), g.const(p["head.bias"]), transB=1)
    if cfg.distilled:  # the mean of the class token's head and the distillation token's
        dist = g.op("Gemm", g.op("Gather", x, g.ints(1), axis=1), g.const(p["head_dist.weight"]),
                    g.const(p["head_dist.bias"]), transB=1)
        logits = g.op("Mul", g.op("Add", logits, dist), g.const(0.5))
    return logits


def onnx_model(params, cfg: ViTConfig, metadata: dict):
    """The onnx ModelProto of cfg's forward with these (NumPy, float32) params."""
    onnx = _onnx()
    g = _Graph(onnx, np.float32)
    p = {k: np.asarray(v, np.float32) for k, v in params.items()}
    x = _embed(g, "pixel_values", p, cfg)
    for i in range(cfg.depth):
        x = _block(g, x, p, i, cfg)
    logits = _pool_and_head(g, x, p, cfg)
    g.nodes.append(onnx.helper.make_node("Identity", [logits], ["logits"]))
    S = cfg.img_size
    graph = onnx.helper.make_graph(
        g.nodes, "tinyvit", [onnx.helper.make_tensor_value_info("pixel_values", onnx.TensorProto.FLOAT,
                                                                ["batch", cfg.in_chans, S, S])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", cfg.num_classes])], g.inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                                   producer_name="tinyvit")
    onnx.helper.set_model_props(model, {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    return model


def write_onnx(out, model, size):
    """Write the model atomically: one file, or past 2 GiB the graph with its weights in OUT.data."""
    onnx = _onnx()
    out = Path(out)
    if size < EXTERNAL_PAST:
        data = model.SerializeToString()
        atomic_write(out, lambda f: f.write(data))
        return [str(out)]
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:  # both files into a temporary folder, then each renamed into place
        onnx.save_model(model, str(tmp / out.name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=out.name + ".data", size_threshold=1024)
        os.replace(tmp / (out.name + ".data"), out.parent / (out.name + ".data"))
        os.replace(tmp / out.name, out)
    finally:
        for f in tmp.glob("*"):
            f.unlink()
        tmp.rmdir()
    return [str(out), str(out.parent / (out.name + ".data"))]
