"""Convert public ViT weights (Google .npz, timm, torchvision, HF, OpenCLIP) into a tinyvit checkpoint.

Example:
  python scripts/convert_weights.py ViT-B_16.npz --out weights/vit-b16.npz
  python scripts/convert_weights.py timm/vit_small_patch14_dinov2.lvd142m --out weights/dinov2-s.npz
  python scripts/convert_weights.py pytorch_model.bin --format hf --img-size 384 --num-classes 10 \\
      --out weights/vit-b16-384-c10.npz

Class names, mean/std and the eval transform come along when the source states them: tinyvit's own
timm export (its __metadata__), a timm hub config.json (label_names, pretrained_cfg) or HF's
config.json / preprocessor_config.json beside the file, else from the architecture (--arch, or what
the layout names); what nothing states is guessed and said in a `note:` line on stderr.
--img-size keeps the transform (it is relative).
--adapter DIR merges a PEFT LoRA/DoRA adapter folder (adapter_config.json, adapter_model.safetensors; HF's
module names, transformers 5's or 4's, or timm's) into the weights: W + scale B A, DoRA's magnitude applied;
a head it saves (modules_to_save) replaces the source's.
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

from tinyvit.errors import TinyViTError, describe_os_error
from tinyvit.io.checkpoint import save_checkpoint
from tinyvit.io.convert import FORMATS, adapt, convert
from tinyvit.io.filekind import check_convert
from tinyvit.io.files import prepare_out_dir
from tinyvit.io.peft import apply_adapter
from tinyvit.nn.lora import merged_model
from tinyvit.nn.model import count_params


def parse_args(argv=None):
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="weights file (.npz in Google or timm layout, .safetensors, .pth/.pt/.bin/.ckpt), "
                                "a timm or HF hub folder holding config.json and the weights, or a Hugging Face Hub "
                                "name (timm/NAME, ORG/REPO, hf-hub:ORG/REPO, each with an optional @REVISION), "
                                "downloaded once into huggingface_hub's cache ($HF_HOME)")
    ap.add_argument("--out", required=True, help="tinyvit checkpoint to write, a name ending in .npz "
                                                 "(e.g. weights/vit-b16.npz); not the source itself")
    ap.add_argument("--format", default="auto", choices=("auto",) + FORMATS,
                    help="source layout; auto tells it from the key names (default auto)")
    ap.add_argument("--heads", type=int, default=None,
                    help="attention heads (default: from Google kernels, HF config.json or the architecture, else "
                         "width // 64, said in a note)")
    ap.add_argument("--arch", default=None,
                    help="timm's architecture name (e.g. vit_base_patch16_clip_quickgelu_224) or torchvision's "
                         "(vit_h_14), for what the weights cannot tell: heads, activation, LayerNorm eps, pooling, "
                         "mean/std and eval transform, as timm's definition of the name (tinyvit.io.archs lists "
                         "them) (default: a timm config.json's; torchvision's by its sizes; else exact GELU, "
                         "eps 1e-6, mean/std 0.5, crop 0.875, said in a note)")
    ap.add_argument("--img-size", type=int, default=None,
                    help="new input size: resamples pos_embed as the source's library does (bicubic with "
                         "antialiasing for timm and HF, bilinear for Google and torchvision) (default: keep it)")
    ap.add_argument("--num-classes", type=int, default=None,
                    help="new class count: replaces the head by a zero-initialised one; a backbone without a head "
                         "gets one of this size (default: keep it; 1000 for a backbone)")
    ap.add_argument("--adapter", default=None,
                    help="PEFT adapter folder (LoRA or DoRA: adapter_config.json, adapter_model.safetensors) to merge "
                         "into the weights, its saved head (modules_to_save) included (default: none)")
    ap.add_argument("--dynamic-img-size", action="store_true",
                    help="let the model take images of any height and width that are multiples of the patch size, "
                         "pos_embed resampled in the forward as timm's dynamic_img_size (then predict.py, "
                         "evaluate.py take --img-size H,W or --keep-aspect) (default: the stored size only)")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON line instead of text")
    return ap.parse_args(argv)


def main(argv=None):
    """Convert, optionally adapt, save; one summary line on stdout."""
    args = parse_args(argv)
    try:
        check_convert(args.src, args.out)  # a tinyvit checkpoint, an --out not .npz or the source: one line
        prepare_out_dir(Path(args.out).parent)  # a wrong --out fails before the conversion
        params, cfg, meta = convert(args.src, fmt=args.format, heads=args.heads, arch=args.arch,
                                    num_classes=args.num_classes)
        if args.adapter:
            classes = cfg.num_classes
            params, cfg, notes = apply_adapter(args.adapter, params, cfg)
            params, cfg = merged_model(params, cfg)
            meta["notes"] += notes + [f"adapter {args.adapter} merged"]
            if cfg.num_classes != classes:
                meta["class_names"] = [f"class_{i}" for i in range(cfg.num_classes)]
        old_classes, old_size = cfg.num_classes, cfg.img_size
        params, cfg = adapt(params, cfg, img_size=args.img_size, num_classes=args.num_classes,
                            resample=meta["resample"])
        if cfg.num_classes != old_classes:
            meta["class_names"] = [f"class_{i}" for i in range(cfg.num_classes)]
            meta["notes"].append(f"head replaced by a zero-initialised {cfg.num_classes}-class one")
        if args.dynamic_img_size:
            cfg = dataclasses.replace(cfg, dynamic_img_size=True)
        if cfg.img_size != old_size:
            meta["notes"].append(f"pos_embed resampled ({meta['resample']}) to {cfg.img_size // cfg.patch_size}^2 patches")
        out = save_checkpoint(args.out, params, cfg, meta)
    except TinyViTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, no permission, ...: one line, as the other scripts
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    for note in meta["notes"]:  # what was guessed or replaced, one line each
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps({"source": str(args.src), "format": meta["format"], "checkpoint": str(out),
                          "params": count_params(params), "config": cfg.to_dict(), "notes": meta["notes"]}))
        return 0
    print(f"{meta['format']} -> {out}: img {cfg.img_size} patch {cfg.patch_size} dim {cfg.dim} "
          f"depth {cfg.depth} heads {cfg.heads} mlp {cfg.mlp_dim} classes {cfg.num_classes} "
          f"eps {cfg.ln_eps:g} gelu {cfg.gelu} pool {cfg.global_pool}{', any input size' if cfg.dynamic_img_size else ''}, "
          f"{count_params(params):,} params")
    return 0


if __name__ == "__main__":
    sys.exit(main())
