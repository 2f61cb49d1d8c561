"""Hostile hub folders (tinyvit.io.untrusted): valid weights, written by timm's save_for_hf and transformers'
save_pretrained, beside edited config files; each broken file or bad value is one line naming the file and
the field, found before anything is allocated from it."""
import json
import time

import pytest
import torch
from helpers import SCRIPTS, run_script
from timm_oracle import timm

from tinyvit import TinyViTError, load_model
from tinyvit.io.convert import convert

transformers = pytest.importorskip("transformers")
save_for_hf = pytest.importorskip("timm.models._hub").save_for_hf
ARGS = dict(embed_dim=32, depth=1, num_heads=2, img_size=32, num_classes=3)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{'timm': a timm hub folder, 'hf': an HF ViT folder with its preprocessor_config.json}."""
    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    save_for_hf(timm.create_model("vit_base_patch16_224", pretrained=False, **ARGS).eval(), root / "timm",
                model_args=ARGS, safe_serialization=True)
    t = transformers
    t.ViTForImageClassification(t.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=64, image_size=32, patch_size=16, num_labels=3)
                                ).save_pretrained(root / "hf")
    t.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "hf")
    return {"timm": root / "timm", "hf": root / "hf"}


def _edited(folders, tmp_path, kind, name, edit):
    """A copy of the folder with file `name` edited: edit(dict) -> dict, or the file's new text."""
    for f in folders[kind].iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    f = tmp_path / name
    if callable(edit):
        d = json.loads(f.read_text())
        f.write_text(json.dumps(edit(d)))
    else:
        f.write_text(edit)
    return tmp_path


def _set(path, value):
    """An edit setting d[path[0]][path[1]]... = value."""
    def edit(d):
        at = d
        for k in path[:-1]:
            at = at[k]
        at[path[-1]] = value
        return d
    return edit


HOSTILE = {  # (folder, file, edit, what the line says)
    "img_size 10^6": ("timm", "config.json", _set(["model_args", "img_size"], 1000000),
                      r"config\.json: model_args img_size = 1000000 is not a whole number from 1 to 4096"),
    "timm config not JSON": ("timm", "config.json", '{"architecture": "vit_base_patch16_224", ',
                             r"config\.json: is not JSON \(JSONDecodeError"),
    "model_args a list": ("timm", "config.json", _set(["model_args"], [1, 2]), r"config\.json: model_args = \[1, 2\] is not an object"),
    "num_heads a string": ("timm", "config.json", _set(["model_args", "num_heads"], "2"),
                           r'config\.json: model_args num_heads = "2" is not a whole number'),
    "heads 0": ("hf", "config.json", _set(["num_attention_heads"], 0),
                r"config\.json: num_attention_heads = 0 is not a whole number from 1 to 1024"),
    "heads against the weights": ("hf", "config.json", _set(["num_attention_heads"], 3), r"not divisible by heads 3"),
    "eps a string": ("hf", "config.json", _set(["layer_norm_eps"], "x"), r'config\.json: layer_norm_eps = "x" is not a number'),
    "eps negative": ("hf", "config.json", _set(["layer_norm_eps"], -1e-6), r"config\.json: layer_norm_eps = -1e-06 is not"),
    "hf config not JSON": ("hf", "config.json", "\xff\xfe", r"config\.json: is not JSON"),
    "config a list": ("hf", "config.json", "[1, 2, 3]", r"config\.json: holds a JSON list"),
    "preprocessor not JSON": ("hf", "preprocessor_config.json", "{", r"preprocessor_config\.json: is not JSON"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_config_is_one_line_naming_file_and_field(folders, tmp_path, case):
    kind, name, edit, says = HOSTILE[case]
    folder = _edited(folders, tmp_path, kind, name, edit)
    t = time.perf_counter()
    with pytest.raises(TinyViTError, match=says) as e:
        load_model(folder)
    assert "\n" not in str(e.value) and time.perf_counter() - t < 5  # refused before any large allocation


def test_the_unedited_folders_convert(folders):
    for kind in ("timm", "hf"):
        assert convert(folders[kind])[1].heads == 2


@pytest.mark.e2e
def test_convert_weights_refuses_a_hostile_img_size_in_one_line(folders, tmp_path):
    (tmp_path / "in").mkdir()
    folder = _edited(folders, tmp_path / "in", "timm", "config.json", _set(["model_args", "img_size"], 1000000))
    r = run_script(SCRIPTS / "convert_weights.py", folder, "--out", tmp_path / "m.npz")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "model_args img_size = 1000000" in lines[0], r.stderr
