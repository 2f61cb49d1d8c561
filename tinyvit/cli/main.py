"""The `tinyvit` command (pyproject.toml's [project.scripts]): `tinyvit SUB ...` runs the same parser and code as
scripts/SUB.py in a checkout, the module of tinyvit/cli/commands/ both call."""
import argparse
import sys
from importlib import metadata

from .commands import (
    benchmark,
    convert_weights,
    decode_rate,
    embed,
    evaluate,
    export_weights,
    finetune,
    finetune_cifar,
    fit_erf,
    knn,
    knn_vs_timm,
    mpi_scaling,
    plot_metrics,
    predict,
    search,
    show_patches,
    train_mnist,
)
from .report import run

# subcommand -> (its module, one line for `tinyvit --help`); the script of each is scripts/<module name>.py.
# Left out: scripts/gpu_check.py and record_cupy_api.py, maintainer tools that run from a checkout (the one
# runs the checkout's own checks, the other rewrites tinyvit/testing/cupy_api.json in it).
COMMANDS = {
    "train-mnist": (train_mnist, "train a ViT on MNIST from random init (NumPy on CPU, CuPy on a GPU)"),
    "finetune": (finetune, "fine-tune a ViT on your own image folders, Oxford-IIIT Pet or CIFAR-10"),
    "finetune-cifar": (finetune_cifar, "fine-tune pretrained weights on CIFAR-10 (finetune's flags, CIFAR-10's defaults)"),
    "predict": (predict, "classify images with a checkpoint, a weights file or a hub folder"),
    "evaluate": (evaluate, "test-set accuracy on MNIST, CIFAR-10, Oxford-IIIT Pet or an image folder"),
    "convert": (convert_weights, "convert Google, timm, torchvision, HF or OpenCLIP ViT weights into a checkpoint"),
    "export": (export_weights, "export a checkpoint to timm, Hugging Face, ONNX or a PEFT adapter folder"),
    "embed": (embed, "embed images with a checkpoint's backbone, for knn and search"),
    "knn": (knn, "k-NN classification of one embed folder's images by another's"),
    "search": (search, "the nearest images of an embed folder by cosine similarity"),
    "plot": (plot_metrics, "plot a training run's loss and accuracy curves (needs matplotlib)"),
    "show-patches": (show_patches, "draw an image cut into its patch grid, beside the sequence of patches"),
    "benchmark": (benchmark, "time forward, backward and a train step; --vs-torch against PyTorch, --memory"),
    "decode-rate": (decode_rate, "how fast this machine decodes an image folder, against how fast a model trains"),
    "knn-vs-timm": (knn_vs_timm, "the k-NN figure's cross-check with timm's own model (needs torch and timm)"),
    "mpi-scaling": (mpi_scaling, "step time and the Allreduce's share over MPI ranks (run it under mpiexec)"),
    "fit-erf": (fit_erf, "regenerate the erf coefficients of tinyvit/backend.py (a development tool; needs mpmath)"),
}


def version() -> str:
    """The installed distribution's version, else (a checkout on PYTHONPATH) the package's own."""
    try:
        return metadata.version("tinyvit")
    except metadata.PackageNotFoundError:
        from .. import __version__
        return __version__


def parser() -> argparse.ArgumentParser:
    """`tinyvit`'s own flags and the list of subcommands, one line each (each parses its own flags)."""
    width = max(map(len, COMMANDS)) + 2
    table = "\n".join(f"  {name:<{width}}{line}" for name, (_, line) in COMMANDS.items())
    ap = argparse.ArgumentParser(prog="tinyvit", usage="tinyvit [-h] [--version] SUB [ARGS ...]", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="A Vision Transformer in NumPy/CuPy: its commands, each the same as "
                                             "scripts/<module>.py in a checkout.",
                                 epilog=f"commands:\n{table}\n\n`tinyvit SUB --help` shows the flags of one.")
    ap.add_argument("--version", action="version", version=f"tinyvit {version()}", help="print the version and exit")
    ap.add_argument("command", metavar="SUB", choices=COMMANDS, help="the command to run (the list below); its flags and arguments follow it")
    return ap


def main(argv=None):
    """`tinyvit SUB ARGS...`: SUB's main with ARGS, its help and errors under the name `tinyvit SUB`; else
    tinyvit's own help, version or usage error."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        sys.argv = [f"tinyvit {argv[0]}", *argv[1:]]  # argparse's prog, and the command report.py's resume line names
        run(COMMANDS[argv[0]][0].main)
    parser().parse_args(argv)  # --help, --version, or no / an unknown SUB: argparse says so and exits
