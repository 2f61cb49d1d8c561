"""A reference ViT in PyTorch with timm's module names: the tests' gradient oracle and benchmark.py's rival.

Not a command: benchmark.py imports it with --vs-torch or --memory only, and the tests as `import torch_vit`
(scripts/torch_vit.py, through pytest's pythonpath setting in pyproject.toml). The library never imports torch."""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


class Attention(nn.Module):
    """timm's Attention: fused qkv, softmax(q k^T / sqrt(d)) v, output projection."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = (q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5
        a = a.softmax(dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, approximate):
        super().__init__()
        self.fc1, self.fc2, self.approximate = nn.Linear(dim, hidden), nn.Linear(hidden, dim), approximate

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        approx = "none" if cfg.gelu == "erf" else "tanh"
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.attn = Attention(cfg.dim, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg.dim, cfg.mlp_dim, approx)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class TorchViT(nn.Module):
    """Same names as timm's VisionTransformer, so a tinyvit params dict loads with strict=True."""

    def __init__(self, cfg):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.dim))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self.grad_checkpointing = False  # timm's name: keep each block's input, recompute it in the backward

    def set_grad_checkpointing(self, enable=True):
        """As timm's models: torch.utils.checkpoint around each block."""
        self.grad_checkpointing = enable

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.head(self.norm(x)[:, 0])


def torch_vit_from_params(cfg, params, dtype=torch.float64):
    """A TorchViT loaded (strictly) with a tinyvit params dict of NumPy arrays."""
    model = TorchViT(cfg).to(dtype)
    model.load_state_dict({k: torch.tensor(v, dtype=dtype) for k, v in params.items()}, strict=True)
    return model
