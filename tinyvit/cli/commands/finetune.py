"""Fine-tune a ViT on your own images (one folder per class), Oxford-IIIT Pet or CIFAR-10.

  python scripts/finetune.py --data DIR --weights W --mode head|full|progressive
  python scripts/finetune.py --data pets --weights W
  python scripts/finetune.py --data DIR --preset vit-ti16 --mode full   (random init)

The checkpoint (OUT/model.npz) carries the class names; evaluate.py and predict.py read it.
"""
from tinyvit.cli import finetune
from tinyvit.cli.report import run


def main(argv=None):
    """scripts/finetune.py and `tinyvit finetune`: the fine-tuning command with its own defaults."""
    return finetune.main(__doc__, data_default=None, out_default="runs/finetune", argv=argv)


if __name__ == "__main__":
    run(main)
