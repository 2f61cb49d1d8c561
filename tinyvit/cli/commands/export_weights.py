"""Export a tinyvit checkpoint to timm (its hub folder, or one .safetensors state dict), Hugging Face
transformers (a folder) or ONNX (one .onnx file).

Examples:
  python scripts/export_weights.py runs/finetune/model.npz --to timm --out vit-timm/
  python scripts/export_weights.py runs/cifar/model.npz --to timm --out vit.safetensors
  python scripts/export_weights.py runs/cifar/model.npz --to hf --out vit-hf/
  python scripts/export_weights.py runs/cifar/model.npz --to onnx --out model.onnx
  python scripts/export_weights.py runs/lora/model.npz --to peft --out vit-lora/

An --out that holds files (an earlier export, any other folder) needs --overwrite. Weights that are not a
tinyvit checkpoint (a timm or HF file or hub folder) are converted first with scripts/convert_weights.py.

timm, a folder: timm's hub folder (config.json with architecture, model_args and pretrained_cfg, and
model.safetensors), which timm.create_model('local-dir:vit-timm', pretrained=True) builds and loads, for
every family tinyvit runs whose LayerNorm eps is timm's 1e-6 or CLIP's 1e-5, except DINOv2's head over
the class token beside the patch mean (timm pools one or the other: --to hf or --to onnx write it).
timm, a .safetensors file: its __metadata__ (strings) names the class, model_class (VisionTransformer, or
VisionTransformerDistilled in timm.models.deit), and holds its arguments as JSON: img_size, patch_size,
in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, class_token, fc_norm, reg_tokens,
no_embed_class, pre_norm, init_values; as names: global_pool, act_layer; and norm_eps. Build the model
with kw = {k: json.loads(md[k]) for those}, global_pool=md['global_pool'], act_layer=md['act_layer'],
norm_layer=partial(nn.LayerNorm, eps=float(md['norm_eps'])), then load the file with
safetensors.torch.load_file + load_state_dict(strict=True). It also holds, as JSON, the class names, mean,
std, tinyvit config and eval transform; scripts/convert_weights.py reads it back with all of that.
hf: AutoModelForImageClassification.from_pretrained(folder) (ViTForImageClassification,
DeiTForImageClassificationWithTeacher, Dinov2ForImageClassification or
Dinov2WithRegistersForImageClassification, by family) and AutoImageProcessor.from_pretrained(folder) (a
ViTImageProcessor, or a ConvNextImageProcessor for a shortest-edge eval transform below 384 px); 3-channel models only (transformers feeds RGB).
A checkpoint with LoRA/DoRA adapters exports to timm, hf and onnx merged (W + scale B A, DoRA's magnitude
applied): the files need nothing new to load.
peft: PEFT's adapter folder (adapter_config.json, adapter_model.safetensors) for the HF class --to hf writes
(ViT, DeiT, DINOv2), module names as the installed transformers has them, the head as modules_to_save:
peft.PeftModel.from_pretrained(base, folder) on the --to hf export of the base (the checkpoint without
its adapters) gives tinyvit's logits.
onnx: a graph built with the onnx package (pip install onnx; opset 17): input pixel_values (batch, C, S,
S) float32, output logits; the class names and the eval transform in its metadata.
"""
import argparse
import json

import tinyvit  # noqa: F401  (before NumPy: sets OpenBLAS's spin time, see tinyvit/__init__.py)
from tinyvit.cli.report import run
from tinyvit.io.export import TARGETS, export


def build_parser():
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="tinyvit checkpoint .npz to export (e.g. model.npz from a training run, "
                                       "or one scripts/convert_weights.py wrote)")
    ap.add_argument("--to", required=True, choices=TARGETS,
                    help="timm: timm's hub folder (config.json, model.safetensors: timm.create_model("
                         "'local-dir:DIR', pretrained=True)) or one .safetensors state dict; hf: a transformers "
                         "folder; onnx: one .onnx file (each merges LoRA/DoRA adapters); peft: the adapters as PEFT's "
                         "adapter folder")
    ap.add_argument("--out", required=True,
                    help="output: a folder (--to timm: timm's hub folder; --to hf; --to peft), a .safetensors file (--to timm) "
                         "or a .onnx file (--to onnx)")
    ap.add_argument("--overwrite", action="store_true",
                    help="let --out name a file or a folder that holds files, replacing the export's files there "
                         "(and an earlier export's that would contradict them)")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON line instead of text")
    return ap


def summary_line(s):
    """One readable line: what was written where."""
    c = s["config"]
    return (f"{s['checkpoint']} -> {s['target']}: {', '.join(s['files'])} ({s['tensors']} tensors, "
            f"{s['params']:,} params, {s['dtype']}; img {c['img_size']} patch {c['patch_size']} dim {c['dim']} "
            f"depth {c['depth']} heads {c['heads']} mlp {c['mlp_dim']} classes {c['num_classes']} "
            f"gelu {c['gelu']} eps {c['ln_eps']:g})")


def main(argv=None):
    """Export; one summary line on stdout."""
    args = build_parser().parse_args(argv)
    summary = export(args.checkpoint, args.to, args.out, overwrite=args.overwrite)
    print(json.dumps(summary) if args.json else summary_line(summary))
    return 0


if __name__ == "__main__":
    run(main)
