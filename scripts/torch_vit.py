"""The reference ViT in PyTorch (tinyvit/cli/torch_vit.py) as `import torch_vit`: the tests' gradient oracle,
importable through pytest's pythonpath setting in pyproject.toml."""
from tinyvit.cli.torch_vit import Attention, Block, Mlp, PatchEmbed, TorchViT, torch_vit_from_params  # noqa: F401
