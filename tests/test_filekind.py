"""tinyvit.io.filekind: a file's kind from its first bytes (the suffix only when they say nothing)."""
import zipfile

import numpy as np
import pytest
from PIL import Image

from tinyvit import TinyViTError, init_params, preset
from tinyvit.io.checkpoint import save_checkpoint
from tinyvit.io.filekind import check_convert, file_kind, folder_kind, key_names
from tinyvit.io.safetensors import write_safetensors


def _torch_zip(path):
    with zipfile.ZipFile(path, "w") as z:  # torch.save's layout: <archive>/data.pkl beside the storages
        z.writestr("vit/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("vit/byteorder", "little")


def _savez(path, **arrays):
    with open(path, "wb") as f:  # np.savez adds .npz to a path without it
        np.savez(f, **arrays)


WRITERS = {  # file name -> (writer, kind)
    "ckpt.bin": (lambda f: save_checkpoint(f, init_params(preset("mnist", depth=1)), preset("mnist", depth=1)),
                 "tinyvit"),
    "google.pth": (lambda f: _savez(f, a=np.zeros(2)), "npz"),
    "w.npz": (lambda f: write_safetensors(f, {"a": np.zeros(2, np.float32)}), "safetensors"),
    "w.safetensors": (_torch_zip, "torch"),
    "legacy.pth": (lambda f: f.write_bytes(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."), "torch"),
    "broken.npz": (lambda f: f.write_bytes(b"PK\x03\x04 truncated"), "npz"),
    "photo.safetensors": (lambda f: Image.new("RGB", (4, 4)).save(f, format="JPEG"), "image"),
    "x.npz": (lambda f: Image.new("RGB", (4, 4)).save(f, format="PNG"), "image"),
    "x.webp.bin": (lambda f: f.write_bytes(b"RIFF\x10\x00\x00\x00WEBPVP8 "), "image"),
    "junk.TIFF": (lambda f: f.write_bytes(b"not one"), "image"),
    "notes.txt": (lambda f: f.write_bytes(b"hello"), None),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_file_kind(tmp_path, name):
    write, kind = WRITERS[name]
    write(tmp_path / name)
    assert file_kind(tmp_path / name) == kind


def test_folder_kind(tmp_path):
    for name, files, kind in (("run", {"model.npz": b""}, "run"),
                              ("timm", {"config.json": b'{"architecture": "vit_base_patch16_224"}'}, "timm"),
                              ("hf", {"config.json": b'{"model_type": "vit"}'}, "hf"),
                              ("data", {"cat.jpg": b"", "config.json": b"[1, 2"}, None)):
        (tmp_path / name).mkdir()
        for f, b in files.items():
            (tmp_path / name / f).write_bytes(b)
        assert folder_kind(tmp_path / name) == kind


def test_key_names_without_the_tensors(tmp_path):
    _savez(tmp_path / "a.npz", **{"blocks.0.attn.qkv.weight": np.zeros(2)})
    write_safetensors(tmp_path / "b.safetensors", {"cls_token": np.zeros(2, np.float32)}, {"format": "pt"})
    (tmp_path / "c.npz").write_bytes(b"PK\x03\x04 truncated")
    assert key_names(tmp_path / "a.npz", "npz") == ["blocks.0.attn.qkv.weight"]
    assert key_names(tmp_path / "b.safetensors", "safetensors") == ["cls_token"]
    assert key_names(tmp_path / "c.npz", "npz") == [] and key_names(tmp_path / "a.npz", "torch") == []


def test_check_convert_refuses_a_checkpoint_a_name_not_npz_and_the_source(tmp_path):
    cfg = preset("mnist", depth=1)
    ckpt = save_checkpoint(tmp_path / "ckpt.npz", init_params(cfg), cfg)
    _savez(tmp_path / "timm.npz", a=np.zeros(2))
    for src, out, what in ((ckpt, tmp_path / "x.npz", "already a tinyvit checkpoint"),
                           (tmp_path / "timm.npz", tmp_path / "x.safetensors", "ending in .npz"),
                           (tmp_path / "timm.npz", tmp_path / "x", "ending in .npz"),
                           (tmp_path / "timm.npz", tmp_path / "timm.npz", "is the source")):
        with pytest.raises(TinyViTError, match=what):
            check_convert(src, out)
    check_convert(tmp_path / "timm.npz", tmp_path / "x.NPZ")  # fine
