"""Fine-tuning (tinyvit.train.finetune) through its command line: seeded runs of every mode give the
same weights bit for bit as the code before the recipe dataclasses (digests recorded then); partial
mode's frozen blocks, its token cache against the run without it, its resume and its cache keys."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import class_folders, last_json, run_script
from PIL import Image

from tinyvit import TinyViTError, init_params
from tinyvit.cli.finetune import data_source, main, model_source, parse, parser, recipe, train_settings
from tinyvit.data.datasets import load_data
from tinyvit.io.checkpoint import load_checkpoint, save_checkpoint
from tinyvit.io.convert import adapt
from tinyvit.nn.layers import cross_entropy_backward, cross_entropy_forward
from tinyvit.nn.lora import add_adapters, merge_adapters
from tinyvit.nn.lora import trainable_names as lora_trainable
from tinyvit.nn.model import ViTConfig, vit_backward, vit_forward
from tinyvit.train.cache import below
from tinyvit.train.evaluate import evaluate
from tinyvit.train.finetune import start_model
from tinyvit.train.optim import clip_grad_norm, run_schedule

TINY = ViTConfig(img_size=32, patch_size=8, in_chans=3, num_classes=5, dim=32, depth=3, heads=2, mlp_dim=64)


def _folder(root, n=8, classes=("a", "b")):
    """Class folders of noisy colour images (24x30 px)."""
    return class_folders(root, n, classes, noise=60)


@pytest.fixture
def tiny_run(tmp_path, monkeypatch, capsys):
    """run(*flags) -> (the run's JSON summary, its model.npz params or None): the fine-tuning command in-process
    on a tiny folder and tiny weights, two shards fixed (the digests do not depend on the core count)."""
    monkeypatch.setenv("TINYVIT_SHARDS", "2")
    monkeypatch.setenv("TINYVIT_CACHE", str(tmp_path / "cache"))  # a --resume's cache (--cache-dir is not saved)
    data = _folder(tmp_path / "data")
    weights = save_checkpoint(tmp_path / "w.npz", init_params(TINY, seed=1), TINY, meta={})
    n = [0]

    def run(*flags, out=None, source=("--data", data, "--val-split", "0.25"), argv=None):
        n[0] += 1
        out = out or tmp_path / f"run{n[0]}"
        argv = argv or [*map(str, source), "--weights", str(weights), "--batch-size", "4",
                        "--cache-dir", str(tmp_path / "cache"), "--out", str(out), *map(str, flags)]
        argv += ["--quiet", "--json"]
        capsys.readouterr()
        assert main("x", argv=argv) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        model = Path(summary["checkpoint"]).parent / "model.npz"
        return summary, load_checkpoint(model)[0] if model.is_file() else None

    run.data, run.weights, run.cache = data, weights, tmp_path / "cache"
    return run


def digest(params) -> str:
    """sha256 over the params' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(params):
        v = np.ascontiguousarray(params[k])
        h.update(f"{k}{v.dtype}{v.shape}".encode())
        h.update(v.tobytes())
    return h.hexdigest()


# recorded on the code before the fine-tuning recipe became dataclasses (argparse's namespace then
# travelled into tinyvit.train): the same seeded runs give the same bytes
DIGESTS = {
    "head": "42daad4b42cbb852a248ca737b8bc94c92bf09989f4703cf9891b1fd2842e5e6",
    "full": "1029cb4eed7e1e7bb5886d695f4735b3dfecb6ba8e6eaf87565aa0b0eccc7225",
    "progressive": "8ed81e31fd4f7f9dc15626f17b31c324cd88b13ff114fbfe098a5c03a11e6982",
    "cifar10": "307bb51d2fbe337eb491d14a1f500c8fc3723a74310017bcd9c00d578884eaa5",
}
FLAGS = {
    "head": ["--mode", "head", "--epochs", "3"],
    "full": ["--mode", "full", "--epochs", "2", "--drop-path", "0.1", "--augment", "crop_flip", "--seed", "3"],
    "progressive": ["--mode", "progressive", "--epochs", "2", "--head-epochs", "1", "--layer-decay", "0.75"],
    "cifar10": ["--mode", "full", "--epochs", "1", "--limit-train", "16", "--limit-test", "8"],
}


@pytest.mark.parametrize("mode", list(FLAGS))
def test_seeded_runs_give_the_recorded_weights(tiny_run, mode, request):
    source = {}
    if mode == "cifar10":
        source = {"source": ("--data", "cifar10", "--data-dir", request.getfixturevalue("cifar_root"))}
    summary, params = tiny_run(*FLAGS[mode], **source)
    assert digest(params) == DIGESTS[mode]


# --- partial mode ---------------------------------------------------------------------------------

PARTIAL = ["--mode", "partial", "--train-blocks", "2", "--epochs", "2", "--lr", "1e-3", "--seed", "4"]


def test_partial_mode_keeps_the_frozen_params_and_trains_the_rest(tiny_run):
    summary, params = tiny_run(*PARTIAL)
    start = init_params(TINY, seed=1)
    frozen = [k for k in params if below(k, TINY.depth - 2)]
    assert "blocks.0.mlp.fc1.weight" in frozen and "pos_embed" in frozen and "blocks.1.norm1.bias" not in frozen
    assert all(np.array_equal(params[k], start[k]) for k in frozen)  # bit for bit: the weights it started from
    trained = [k for k in params if k not in frozen and not k.startswith("head.")]
    assert trained and all(not np.array_equal(params[k], start[k]) for k in trained)
    assert summary["mode"] == "partial" and summary["tokens_cached"] is False


def test_partial_mode_from_the_cache_equals_the_run_computed_without_it(tiny_run):
    """float32 tokens from the cache against the whole model's forward and backward on the images,
    with only the last blocks', the norm's and the head's gradients applied, step by step as fit does."""
    flags = [*PARTIAL, "--cache-dtype", "float32"]
    summary, got = tiny_run(*flags)
    argv = ["--data", str(tiny_run.data), "--weights", str(tiny_run.weights), "--val-split", "0.25",
            "--batch-size", "4", "--out", "unused", *flags]
    args = parse(parser("x"), argv)
    tc = train_settings(args)
    params, cfg, meta, t = start_model(model_source(args))
    train, test, names, _ = load_data(data_source(args), cfg.img_size, 3, t)
    params, cfg = adapt(params, cfg, num_classes=len(names))
    stop, opt = cfg.depth - tc.train_blocks, tc.make_optimizer(list(params), cfg.depth)
    steps = len(train.labels) // tc.batch_size
    lr, step = run_schedule(tc, steps), 0
    for epoch in range(tc.epochs):
        for x, y in train.batches(tc.batch_size, np, seed=tc.seed, epoch=epoch, drop_last=True):
            logits, cache = vit_forward(params, x, cfg, train=True)
            grads = vit_backward(cross_entropy_backward(1.0, cross_entropy_forward(logits, y, tc.label_smoothing)[1]),
                                 cache)
            grads = {k: g for k, g in grads.items() if not below(k, stop)}
            clip_grad_norm(grads, tc.clip)
            opt.step({k: params[k] for k in grads}, grads, lr=lr(step))
            step += 1
    assert step == summary["steps"] == 6
    assert max(float(np.abs(got[k] - params[k]).max()) for k in params) < 1e-6
    assert summary["test_accuracy"] == evaluate(got, cfg, test, np)  # on the images, as evaluate.py scores it


def test_partial_mode_resumed_mid_run_is_the_uninterrupted_run(tiny_run, tmp_path):
    straight = tiny_run(*PARTIAL)[1]
    cut, _ = tiny_run(*PARTIAL, "--time-limit", "0", out=tmp_path / "cut")  # stops after one step
    assert cut["stopped_early"] and cut["steps"] == 1 and cut["tokens_cached"] is True
    resumed, params = tiny_run(argv=["--resume", str(tmp_path / "cut" / "checkpoint.npz")])
    assert resumed["epochs"] == 2 and resumed["tokens_cached"] is True
    assert all(np.array_equal(params[k], straight[k]) for k in straight)  # bit for bit
    log = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]


def test_partial_mode_cache_is_hit_on_a_rerun_and_missed_on_changed_data(tiny_run):
    first, a = tiny_run(*PARTIAL)
    again, b = tiny_run(*PARTIAL, "--epochs", "1")  # another recipe of the same tokens: a hit
    assert (first["tokens_cached"], again["tokens_cached"]) == (False, True)
    assert len(list(tiny_run.cache.glob("train-tokens-*[0-9a-f].npy"))) == 1
    Image.fromarray(np.zeros((24, 30, 3), np.uint8)).save(tiny_run.data / "a" / "99.png")  # a changed folder
    changed, _ = tiny_run(*PARTIAL)
    assert changed["tokens_cached"] is False
    assert len(list(tiny_run.cache.glob("train-tokens-*[0-9a-f].npy"))) == 2
    half, _ = tiny_run(*PARTIAL, "--cache-dtype", "float32")  # another dtype: another file
    assert half["tokens_cached"] is False


def test_partial_mode_help_says_augmentation_does_not_apply():
    text = " ".join(parser("x").format_help().split())
    assert "partial: the last --train-blocks blocks" in text and "augmentation does not apply" in text


@pytest.mark.e2e
def test_partial_mode_script_and_evaluate_agree(tmp_path):
    """finetune.py --mode partial as a user runs it, then evaluate.py on its model.npz: a whole model,
    scored on the images as the run scored it on its (float32) cached tokens."""
    data = _folder(tmp_path / "data", n=10)
    weights = save_checkpoint(tmp_path / "w.npz", init_params(TINY, seed=1), TINY, meta={})
    r = run_script("finetune.py", "--data", data, "--weights", weights, "--val-split", "0.3", "--batch-size", "4",
                   *PARTIAL, "--cache-dtype", "float32", "--cache-dir", tmp_path / "cache", "--out", tmp_path / "run",
                   "--json", timeout=120)
    run = last_json(r)
    ev = last_json(run_script("evaluate.py", run["checkpoint"], "--json", timeout=120))
    assert ev["images"] == 6 and ev["test_accuracy"] == run["test_accuracy"]
    assert len(load_checkpoint(run["checkpoint"])[0]) == len(init_params(TINY))  # the whole model


@pytest.mark.parametrize("k", [0, 4])
def test_partial_mode_refuses_a_block_count_the_model_lacks(tiny_run, k):
    with pytest.raises(TinyViTError, match=f"^--train-blocks {k}: this model has 3 blocks: give 1 to 3$"):
        tiny_run("--mode", "partial", "--train-blocks", k)


# --- LoRA, DoRA and BitFit ------------------------------------------------------------------------

LORA = ["--mode", "full", "--epochs", "2", "--lr", "1e-2", "--seed", "2", "--lora-rank", "4"]


def _hand_run(tiny_run, flags, only):
    """The run's steps by hand: the whole model's forward and backward, the gradients of `only(params)` applied."""
    argv = ["--data", str(tiny_run.data), "--weights", str(tiny_run.weights), "--val-split", "0.25",
            "--batch-size", "4", "--out", "unused", *flags]
    args = parse(parser("x"), argv)
    tc, rec = train_settings(args), recipe(args)
    params, cfg, meta, t = start_model(model_source(args))
    train, test, names, _ = load_data(data_source(args), cfg.img_size, 3, t)
    params, cfg = adapt(params, cfg, num_classes=len(names))
    if rec.lora is not None:
        params, cfg = add_adapters(params, cfg, rec.lora, seed=tc.seed)
    trained, opt = set(only(params)), tc.make_optimizer(list(params), cfg.depth)
    steps = len(train.labels) // tc.batch_size
    lr, step, rng = run_schedule(tc, steps), 0, np.random.default_rng(tc.seed)  # the loop's dropout stream
    for epoch in range(tc.epochs):
        for x, y in train.batches(tc.batch_size, np, seed=tc.seed, epoch=epoch, drop_last=True, augment="crop_flip"):
            logits, cache = vit_forward(params, x, cfg, train=True, rng=rng)
            grads = vit_backward(cross_entropy_backward(1.0, cross_entropy_forward(logits, y, tc.label_smoothing)[1]),
                                 cache)
            grads = {k: g for k, g in grads.items() if k in trained}
            clip_grad_norm(grads, tc.clip)
            opt.step({k: params[k] for k in grads}, grads, lr=lr(step))
            step += 1
    return params, trained


@pytest.mark.parametrize("extra", [[], ["--lora-dora", "--lora-targets", "query,value,fc2", "--lora-alpha", "8"],
                                   ["--lora-rslora", "--bias", "all"],
                                   ["--lora-dropout", "0.2", "--lora-targets", "q,v,proj,fc2"]],
                         ids=["lora", "dora", "rslora-bitfit", "dropout"])
def test_lora_run_trains_the_adapters_and_head_alone_as_the_steps_by_hand(tiny_run, extra):
    summary, got = tiny_run(*LORA, *extra)
    want, trained = _hand_run(tiny_run, [*LORA, *extra], lambda p: lora_trainable(p, "all" if "all" in extra else "none"))
    assert set(got) == set(want) and any(".lora_B" in k for k in trained)
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want) < 1e-6
    start = init_params(TINY, seed=1)
    frozen = [k for k in start if k not in trained]
    assert frozen and all(np.array_equal(got[k], start[k]) for k in frozen)  # the base, bit for bit
    assert all(not np.array_equal(got[k], want[k] * 0) for k in trained if ".lora_B" in k)  # B left zero
    assert summary["trained_params"] == sum(got[k].size for k in trained)
    assert summary["lora"]["rank"] == 4 and summary["bias"] == ("all" if "all" in extra else "none")
    assert summary["lora"]["dropout"] == (0.2 if "--lora-dropout" in extra else 0.0)


def test_bitfit_alone_trains_every_bias_and_the_head(tiny_run):
    flags = ["--mode", "full", "--epochs", "1", "--lr", "1e-2", "--bias", "all"]
    summary, got = tiny_run(*flags)
    want, trained = _hand_run(tiny_run, flags, lambda p: lora_trainable(p, "all"))
    assert "blocks.0.norm1.bias" in trained and "blocks.0.attn.qkv.weight" not in trained
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want) < 1e-6
    assert summary["lora"] is None and summary["trained_params"] == sum(got[k].size for k in trained)


def test_lora_run_resumed_mid_run_is_the_uninterrupted_run(tiny_run, tmp_path):
    flags = [*LORA, "--lora-dora", "--lora-targets", "q,v", "--lora-dropout", "0.1"]  # the masks' stream resumes too
    straight = tiny_run(*flags)[1]
    cut, _ = tiny_run(*flags, "--time-limit", "0", out=tmp_path / "cut")  # stops after one step
    assert cut["stopped_early"] and cut["steps"] == 1
    resumed, params = tiny_run(argv=["--resume", str(tmp_path / "cut" / "checkpoint.npz")])
    assert resumed["epochs"] == 2 and resumed["lora"]["dora"] is True and resumed["lora"]["dropout"] == 0.1
    assert set(params) == set(straight) and all(np.array_equal(params[k], straight[k]) for k in straight)


def test_progressive_lora_trains_the_head_first_then_the_adapters(tiny_run):
    summary, got = tiny_run("--mode", "progressive", "--epochs", "2", "--head-epochs", "1", "--lora-rank", "2")
    start = init_params(TINY, seed=1)
    assert all(np.array_equal(got[k], start[k]) for k in start if not k.startswith("head."))
    assert any(np.abs(got[k]).max() > 0 for k in got if ".lora_B" in k)  # the second epoch trained them


@pytest.mark.e2e
def test_an_adapter_folder_continues_training_from_its_adapters(tiny_run, tmp_path):
    """A LoRA run's --to peft folder, given as --adapter on the same base: at lr 0 the run's model holds the
    folder's adapters and head exactly; trained, its adapters move on from there."""
    first = Path(tiny_run(*LORA, "--lora-dora")[0]["checkpoint"])
    peft_dir = tmp_path / "adapter"
    run_script("export_weights.py", str(first), "--to", "peft", "--out", str(peft_dir))
    saved, cfg, _ = load_checkpoint(first)
    s1, same = tiny_run("--mode", "full", "--epochs", "1", "--lr", "0", "--min-lr", "0", "--adapter", str(peft_dir))
    # HF's ViT has q, k and v apart: the qkv adapter comes back as three sharing one A, the same function
    assert s1["lora"]["targets"] == ["q", "k", "v"] and s1["lora"]["dora"] is True
    merged, again = merge_adapters(saved, cfg.lora), merge_adapters(same, cfg.lora)
    assert max(float(np.abs(merged[k] - again[k]).max()) for k in merged) < 1e-6
    _, moved = tiny_run("--mode", "full", "--epochs", "1", "--lr", "1e-2", "--adapter", str(peft_dir))
    assert any(not np.array_equal(moved[k], same[k]) for k in same if ".lora_B" in k)


@pytest.mark.parametrize("flags, says", [
    (["--lora-alpha", "16"], "--lora-alpha needs --lora-rank"),
    (["--mode", "head", "--lora-rank", "4"], "not head"),
    (["--mode", "partial", "--bias", "all"], "not partial"),
    (["--lora-rank", "4", "--adapter", "x"], "drop --lora-rank"),
    (["--lora-rank", "4", "--lora-dropout", "1"], r"lora dropout must be a number in \[0, 1\)"),
    (["--lora-rank", "4", "--lora-targets", "qkv,attention"], "lora targets must be distinct names"),
    (["--lora-rank", "0"], "lora rank must be a whole number"),
])
def test_lora_flags_refuse_in_one_line(tmp_path, flags, says):
    argv = ["--data", str(tmp_path), "--weights", "w.npz", "--out", str(tmp_path / "o"), "--mode", "full", *flags]
    with pytest.raises(TinyViTError, match=says):
        parse(parser("x"), argv)


@pytest.mark.e2e
def test_lora_script_run_exports_merged_and_evaluates(tmp_path):
    data = _folder(tmp_path / "data")
    weights = save_checkpoint(tmp_path / "w.npz", init_params(TINY, seed=1), TINY, meta={})
    out = tmp_path / "run"
    summary = last_json(run_script("finetune.py", "--data", str(data), "--weights", str(weights), "--val-split", "0.25",
                                   "--mode", "full", "--epochs", "1", "--batch-size", "4", "--lora-rank", "4",
                                   "--lora-targets", "qkv,fc1", "--out", str(out), "--quiet", "--json"))
    ev = last_json(run_script("evaluate.py", str(out / "model.npz"), "--json", timeout=120))
    assert ev["test_accuracy"] == summary["test_accuracy"]
    run_script("export_weights.py", str(out / "model.npz"), "--to", "timm", "--out", str(tmp_path / "merged.safetensors"))
    assert (tmp_path / "merged.safetensors").stat().st_size > 0


@pytest.mark.parametrize("flags, lr", [(["--lora-rank", "8"], 1e-3), (["--lora-rank", "8", "--lr", "2e-4"], 2e-4),
                                       ([], 5e-5), (["--mode", "progressive", "--adapter", "dir"], 1e-3)])
def test_lora_runs_default_to_their_own_lr(tmp_path, flags, lr):
    argv = ["--data", str(tmp_path), "--weights", "w.npz", "--out", str(tmp_path / "o"), "--mode", "full", *flags]
    assert train_settings(parse(parser("x"), argv)).lr == lr
