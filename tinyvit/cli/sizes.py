"""--img-size H,W and --keep-aspect: the input size of a model that takes any (dynamic_img_size), one
parser for every script that reads images through a model (predict.py, evaluate.py, embed.py)."""
from ..data.decode import InputSize
from ..errors import TinyViTError


def add_size_args(ap):
    """The two flags, mutually exclusive; both need a model converted with --dynamic-img-size."""
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--img-size", default=None, metavar="H,W",
                   help="run the model at this input size (H,W, or one number for a square), each a multiple of "
                        "the patch size; the eval transform resizes and centre-crops to it as timm's does. Needs "
                        "a model that takes any size (convert_weights.py --dynamic-img-size) (default: the "
                        "model's own size)")
    g.add_argument("--keep-aspect", action="store_true",
                   help="give the model each image whole: its shorter side resized to the model's size, the longer "
                        "in proportion (rounded to a multiple of the patch size), no crop. Needs a model that takes "
                        "any size (convert_weights.py --dynamic-img-size)")


def parse_hw(text, flag="--img-size"):
    """'H,W' (or 'S', a square) -> (H, W) positive ints; anything else is one line."""
    parts = str(text).replace("x", ",").split(",")
    try:
        hw = tuple(int(p) for p in parts)
    except ValueError:
        hw = ()
    if len(hw) == 1:
        hw = hw * 2
    if len(hw) != 2 or min(hw) < 1:
        raise TinyViTError(f"{flag} must be H,W (two positive whole numbers) or one side, got {text!r}")
    return hw


def input_size(img_size, keep_aspect, cfg, source="model"):
    """The InputSize that --img-size (its text, or None) and --keep-aspect ask of cfg's model, or None for
    the model's own size. A model with a fixed size takes only that one; sides the patches do not tile
    are refused."""
    if img_size is None and not keep_aspect:
        return None
    P, S = cfg.patch_size, cfg.img_size
    hw = None if keep_aspect else parse_hw(img_size)
    if hw == (S, S):
        return None  # the model's own size: nothing to ask of it
    if not cfg.dynamic_img_size:
        flag = "--keep-aspect" if keep_aspect else f"--img-size {img_size}"
        raise TinyViTError(f"{source}: {flag} needs a model that takes any input size; this one takes {S}x{S} "
                           f"only (convert its weights with convert_weights.py --dynamic-img-size)")
    if hw is not None and (hw[0] % P or hw[1] % P):
        raise TinyViTError(f"--img-size {img_size}: each side must be a multiple of the patch size {P}")
    return InputSize(side=S, patch=P, hw=hw, keep_aspect=bool(keep_aspect))
