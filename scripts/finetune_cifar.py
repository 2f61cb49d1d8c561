"""Fine-tune pretrained ViT weights on CIFAR-10: the head on cached features, or the whole model.

The CIFAR-10 entry point of scripts/finetune.py (same flags; --data defaults to cifar10)."""
import tinyvit  # noqa: F401  (before NumPy: sets OpenBLAS's spin time, see tinyvit/__init__.py)
from tinyvit.cli.finetune import main
from tinyvit.cli.report import run

if __name__ == "__main__":
    run(lambda: main(__doc__, data_default="cifar10", out_default="runs/cifar10"))
