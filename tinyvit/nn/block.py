"""One transformer block's forward, inference and backward over the timm-named params dict: the piece
the whole model (tinyvit.nn.model), the partial modes and the feature extractors repeat per block."""
from .branch import drop_path_backward, drop_path_forward
from .caches import BlockCache, LayerScaleFold
from .infer import attention_infer, ln_linear_infer, mlp_residual_infer
from .layers import (
    attention_heads_backward,
    attention_heads_forward,
    dropout_backward,
    dropout_forward,
    gelu_inplace,
    gelu_linear_backward,
    gelu_linear_forward,
    layernorm_linear_backward,
    layernorm_linear_forward,
    linear_forward,
    rowsum,
)
from .lora import adapted_block, adapted_layers, adapter_grads
from .lora_branch import add_extra, lora_branch_backward, lora_drop_forward, low_rank_linears

_LS = {"attn.proj": "ls1", "mlp.fc2": "ls2"}  # the LayerScale folded into a branch's last linear


def _folded(params, prefix, linear, gamma):
    """(w, b, fold) of a branch's last linear with the branch's LayerScale folded in when the block has
    one: gamma * (x @ w.T + b) = x @ (gamma w).T + gamma b, no pass over the activations and nothing
    cached for it (dropout and drop path, per element and per sample, commute with it)."""
    w, b, g = params[prefix + linear + ".weight"], params[prefix + linear + ".bias"], params.get(prefix + gamma)
    if g is None:
        return w, b, None
    return w * g[:, None], b * g, LayerScaleFold(g, w, b)


def _unfold(grads, prefix, linear, gamma, dw, db, fold):
    """Write the linear's (and gamma's) grads from those of its folded weight and bias."""
    if fold is None:
        grads[prefix + linear + ".weight"], grads[prefix + linear + ".bias"] = dw, db
        return
    grads[prefix + gamma] = rowsum(dw * fold.w)[:, 0] + db * fold.b  # d/d gamma_i of (gamma_i w_i., gamma_i b_i)
    grads[prefix + linear + ".weight"], grads[prefix + linear + ".bias"] = dw * fold.gamma[:, None], db * fold.gamma


def block_forward(params, prefix, x, cfg, train, rng, keep_cache=True, queries=None, drop_path=0.0):
    """One pre-norm block: x + attn(norm1(x)), then + mlp(norm2(x)); prefix is 'blocks.{i}.'.

    Each norm's affine is folded into the linear after it (layernorm_linear_forward), and each branch's
    LayerScale (ls1, ls2, where the block has it) into the linear before it (_folded): same math. Each
    branch ends in drop path at this rate. queries=n returns the first n tokens alone (B, n, C): every
    token still feeds attention's keys and values, but nothing after the attention is computed for the
    other tokens. Adapters (cfg.lora) act through their linears' weights (tinyvit.nn.lora.adapted_block).
    cfg.precision 'bf16' runs the linears' GEMMs in bfloat16 (tinyvit.nn.layers.linear_forward).
    Plain form: reference.block_forward."""
    params, c_lora = adapted_block(params, prefix, cfg.lora)
    p_lora = cfg.lora.dropout if train and cfg.lora is not None else 0.0  # PEFT's dropout on the adapters' branch
    bf16 = cfg.precision == "bf16"
    qkv, c_n1 = layernorm_linear_forward(x, params[prefix + "norm1.weight"], params[prefix + "norm1.bias"],
                                         params[prefix + "attn.qkv.weight"], params.get(prefix + "attn.qkv.bias"),
                                         cfg.ln_eps, bf16)
    l_qkv = lora_drop_forward(c_lora, "attn.qkv", c_n1, qkv, p_lora, rng)
    w, b, f1 = _folded(params, prefix, "attn.proj", "ls1.gamma")
    h, c_at = attention_heads_forward(qkv, w, b, cfg.heads, cfg.attn_dropout, rng, train, queries, bf16)
    del qkv
    l_proj = lora_drop_forward(c_lora, "attn.proj", c_at.proj, h, p_lora, rng, f1.gamma if f1 else None)
    h, c_d1 = dropout_forward(h, cfg.dropout, rng, train)
    h, c_dp1 = drop_path_forward(h, drop_path, rng, train)
    x = x[:, :h.shape[1]] + h  # (B, n, C)
    h, c_f1 = layernorm_linear_forward(x, params[prefix + "norm2.weight"], params[prefix + "norm2.bias"],
                                       params[prefix + "mlp.fc1.weight"], params[prefix + "mlp.fc1.bias"], cfg.ln_eps,
                                       bf16)
    l_fc1 = lora_drop_forward(c_lora, "mlp.fc1", c_f1, h, p_lora, rng)
    w2, b2, f2 = _folded(params, prefix, "mlp.fc2", "ls2.gamma")
    if keep_cache:  # fc2(dropout(gelu(h))), caching fc1's output and GELU's factor
        h, c_f2 = gelu_linear_forward(h, w2, b2, cfg.gelu, cfg.dropout, rng, train, bf16)
    else:  # inference: GELU in place on fc1's output, nothing kept
        h, _ = dropout_forward(gelu_inplace(h, cfg.gelu), cfg.dropout, rng, train)
        h, c_f2 = linear_forward(h, w2, b2, bf16)
    l_fc2 = lora_drop_forward(c_lora, "mlp.fc2", c_f2, h, p_lora, rng, f2.gamma if f2 else None)
    h, c_d3 = dropout_forward(h, cfg.dropout, rng, train)
    h, c_dp2 = drop_path_forward(h, drop_path, rng, train)
    x += h  # x is our own buffer here (x + h above), so in place is safe
    l_drop = (l_qkv, l_proj, l_fc1, l_fc2) if p_lora else None
    return x, BlockCache(c_n1, c_at, c_d1, c_f1, c_f2, c_d3, f1, c_dp1, f2, c_dp2, c_lora, l_drop)


def block_infer(params, prefix, x, cfg, queries=None):
    """block_forward at inference on NumPy, nothing cached: attention and the MLP run a cache-sized
    block at a time (tinyvit.nn.infer). Same math; plain form: reference.block_forward."""
    params, _ = adapted_block(params, prefix, cfg.lora)
    bf16 = cfg.precision == "bf16"
    qkv = ln_linear_infer(x, params[prefix + "norm1.weight"], params[prefix + "norm1.bias"],
                          params[prefix + "attn.qkv.weight"], params.get(prefix + "attn.qkv.bias"), cfg.ln_eps,
                          q_scale=(cfg.dim // cfg.heads) ** -0.5, bf16=bf16)
    w, b, _ = _folded(params, prefix, "attn.proj", "ls1.gamma")
    h = attention_infer(qkv, w, b, cfg.heads, queries, bf16)
    del qkv
    x = x[:, :h.shape[1]] + h  # (B, n, C), our own buffer: the MLP adds into it in place
    w2, b2, _ = _folded(params, prefix, "mlp.fc2", "ls2.gamma")
    return mlp_residual_infer(x, params[prefix + "norm2.weight"], params[prefix + "norm2.bias"],
                              params[prefix + "mlp.fc1.weight"], params[prefix + "mlp.fc1.bias"], w2, b2,
                              cfg.gelu, cfg.ln_eps, bf16)


def put_grad(grads, name, g):
    """grads[name] = g, unless the layer has no such parameter (g is None: a bias it lacks)."""
    if g is not None:
        grads[name] = g


def block_backward(dx, cache, grads, prefix, want=None, below=True):
    """Reverse of block_forward; writes param grads into `grads`, returns d(block input).

    want(name): whether a param trains (None: all); a frozen layer's weight gradient is not computed.
    below: whether anything under the block trains; if not, the backward stops at the lowest trained
    layer and returns None. `cache` is the block's only remaining reference (popped by vit_backward), so
    each layer's saved arrays are freed as soon as its backward is done: a lower peak, as torch frees
    saved tensors. Plain form: reference.block_backward."""
    c_n1, c_at, c_d1, c_f1, c_f2, c_d3, f1, c_dp1, f2, c_dp2, c_lora, l_drop = cache  # unpacked so each part can be freed
    del cache
    l_qkv, l_proj, l_fc1, l_fc2 = l_drop or (None,) * 4
    own = {k: want is None or any(want(prefix + k + s) for s in (".weight", ".bias", ".gamma"))
           for k in ("mlp.fc2", "ls2", "mlp.fc1", "norm2", "attn.proj", "ls1", "attn.qkv", "norm1")}
    # adapters train through their linear: its output gradient is needed, and its weight gradient unless
    # they take theirs low-rank (tinyvit.nn.lora_branch)
    low = set() if want is None else low_rank_linears(c_lora, lambda k: own[k] or own.get(_LS.get(k)))
    adapted = adapted_layers(c_lora)
    t = {k: v or k in adapted for k, v in own.items()}
    t_attn = below or t["attn.proj"] or t["ls1"] or t["attn.qkv"] or t["norm1"]  # the gradient between the branches
    extra = {}  # the adapters' own gradients (low-rank, dropout's), added once the weight form's are in

    def branch(dy, linear, fused, drop, gamma=None):
        """The adapters' own part at a linear (lora_branch_backward): its extra input gradient, or None."""
        if drop is None and linear not in low:
            return None
        dx, d_gamma = lora_branch_backward(dy, c_lora, linear, fused, drop, linear in low, gamma, extra)
        if d_gamma is not None:
            extra[prefix + _LS[linear] + ".gamma"] = d_gamma
        return dx

    try:
        dh = dropout_backward(drop_path_backward(dx, c_dp2), c_d3)
        e = branch(dh, "mlp.fc2", c_f2, l_fc2, f2.gamma if f2 else None)
        dh, dw, db = gelu_linear_backward(dh, c_f2, t_attn or t["mlp.fc1"] or t["norm2"],
                                          (t["mlp.fc2"] or t["ls2"]) and "mlp.fc2" not in low, e)
        if dw is not None:
            _unfold(grads, prefix, "mlp.fc2", "ls2.gamma", dw, db, f2)
        del c_f2
        if dh is None:
            return None
        e = branch(dh, "mlp.fc1", c_f1, l_fc1)
        dh, grads[prefix + "norm2.weight"], grads[prefix + "norm2.bias"], grads[prefix + "mlp.fc1.weight"], \
            grads[prefix + "mlp.fc1.bias"] = layernorm_linear_backward(dh, c_f1, t_attn, t["mlp.fc1"] and "mlp.fc1" not in low,
                                                                       t["norm2"], e)
        del c_f1
        if not t_attn:
            return None
        dx = dx + dh  # residual: both paths carry the gradient
        dh = dropout_backward(drop_path_backward(dx, c_dp1), c_d1)
        e = branch(dh, "attn.proj", c_at.proj, l_proj, f1.gamma if f1 else None)
        dqkv, dw, db = attention_heads_backward(dh, c_at, below or t["attn.qkv"] or t["norm1"],
                                                (t["attn.proj"] or t["ls1"]) and "attn.proj" not in low, e)
        if dw is not None:
            _unfold(grads, prefix, "attn.proj", "ls1.gamma", dw, db, f1)
        del c_at
        if dqkv is None:
            return None
        e = branch(dqkv, "attn.qkv", c_n1, l_qkv)
        dh, grads[prefix + "norm1.weight"], grads[prefix + "norm1.bias"], grads[prefix + "attn.qkv.weight"], qkv_b = \
            layernorm_linear_backward(dqkv, c_n1, below, t["attn.qkv"] and "attn.qkv" not in low, t["norm1"], e)
        put_grad(grads, prefix + "attn.qkv.bias", qkv_b)
        if not below:
            return None
        dh[:, :dx.shape[1]] += dx  # the residual reaches the tokens the block returned (all, or the first n)
        return dh
    finally:  # every return, the early ones too: the adapters' gradients come from d W_eff
        add_extra(adapter_grads(grads, c_lora), extra)
