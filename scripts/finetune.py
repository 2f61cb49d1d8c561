"""Fine-tune a ViT on your own images (one folder per class), Oxford-IIIT Pet or CIFAR-10.

  python scripts/finetune.py --data DIR --weights W --mode head|full|progressive
  python scripts/finetune.py --data pets --weights W
  python scripts/finetune.py --data DIR --preset vit-ti16 --mode full   (random init)

The checkpoint (OUT/model.npz) carries the class names; evaluate.py and predict.py read it.
"""
import tinyvit  # noqa: F401  (before NumPy: sets OpenBLAS's spin time, see tinyvit/__init__.py)
from tinyvit.cli.finetune import main
from tinyvit.cli.report import run

if __name__ == "__main__":
    run(lambda: main(__doc__, data_default=None, out_default="runs/finetune"))
