"""Fine-tune pretrained ViT weights on CIFAR-10: the head on cached features, or the whole model.

The CIFAR-10 entry point of scripts/finetune.py (same flags; --data defaults to cifar10). With neither
--weights nor --preset it fine-tunes timm's ViT-B/16 (timm/vit_base_patch16_224.augreg2_in21k_ft_in1k,
fetched from the Hugging Face Hub into its cache once) in head mode."""
from tinyvit.cli import finetune
from tinyvit.cli.report import run

# timm's ViT-B/16: Google's AugReg ImageNet-21k weights fine-tuned on ImageNet-1k by timm (85.1% top-1), in
# safetensors with timm's config.json (eval transform, mean/std) beside it: no pickle, no conversion step
WEIGHTS = "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
NOTE = (f"no --weights: fine-tuning {WEIGHTS} (ViT-B/16, 86M params) on CIFAR-10. Expected time on 2 CPU cores "
        f"(14x the ViT-Ti/16 runs in README): head mode (the default), one backbone pass over the 60,000 images at "
        f"224 px, about 4.5 h; --mode full, about 12 h per epoch; a GPU (--backend cupy): minutes. --weights FILE "
        f"fine-tunes other weights")


def main(argv=None):
    """scripts/finetune_cifar.py and `tinyvit finetune-cifar`: fine-tuning with CIFAR-10's defaults."""
    return finetune.main(__doc__, data_default="cifar10", out_default="runs/cifar10", weights_default=(WEIGHTS, NOTE),
                         argv=argv)


if __name__ == "__main__":
    run(main)
