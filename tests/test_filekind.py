"""tinyvit.io.filekind: a file's kind from its first bytes (the suffix only when they say nothing)."""
import zipfile

import numpy as np
import pytest
from PIL import Image

from tinyvit import init_params, preset
from tinyvit.io.checkpoint import save_checkpoint
from tinyvit.io.filekind import file_kind
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
