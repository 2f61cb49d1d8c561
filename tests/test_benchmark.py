"""scripts/benchmark.py's hardware line: which CPU features, BLAS and kernel ran its figures (the timings
themselves are smoke-tested in test_scripts.py)."""
import json

import pytest
from helpers import run_script

from tinyvit.cpu import features

pytestmark = pytest.mark.e2e
TINY = ("--preset", "mnist", "--batch", "2", "--reps", "1", "--rounds", "1")
LABELS = ("AVX2", "AVX-512", "AVX512-BF16", "AMX-BF16")


def test_first_line_says_cpu_features_blas_and_kernel():
    """The kernel OpenBLAS was told to use (OPENBLAS_CORETYPE) is the one the line names, with the variable."""
    r = run_script("benchmark.py", *TINY, extra_env={"OPENBLAS_CORETYPE": "Haswell"})
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith(f"cpu: {features.cpu_name()} (") and all(f"{k} " in first for k in LABELS), first
    assert "| bf16 GEMM: " in first and "[OPENBLAS_CORETYPE=Haswell]" in first, first
    if features.blas_libraries() is not None:
        assert "| BLAS: openblas " in first and "(NumPy, kernel Haswell, " in first, first


def test_json_carries_the_hardware():
    r = run_script("benchmark.py", *TINY, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    hw = out["hardware"]
    assert hw["features"] == features.cpu_features() and hw["cpu"] == features.cpu_name()
    assert isinstance(hw["bf16_gemm"], str) and out["cases"][0]["train_step"]["tinyvit_ms"] > 0
    if features.blas_libraries() is not None:
        assert hw["blas"][0]["numpy"] and hw["blas"][0]["architecture"] == out["cases"][0]["blas"][0]["architecture"]


def test_bf16_races_torch_autocast():
    """--precision bf16 --vs-torch: tinyvit's linears in bf16 against torch under autocast (any CPU: the
    override), the bf16 GEMM's peak beside float32's; refused in one line with --dtype float64."""
    from tinyvit.cpu import bf16

    if bf16.library() is None:
        pytest.skip("oneMKL not installed: pip install mkl (or pip install -e \".[mkl]\"); CI installs it")
    r = run_script("benchmark.py", *TINY, "--precision", "bf16", "--vs-torch", "--json",
                   extra_env={bf16.ANY_CPU_ENV: "1"})
    assert r.returncode == 0, r.stderr
    case = json.loads(r.stdout.strip().splitlines()[-1])["cases"][0]
    assert case["precision"] == "bf16" and case["bf16_matmul_peak_gflops"] > 0
    assert case["torch_bf16_matmul_peak_gflops"] > 0 and case["train_step"]["torch_ms"] > 0
    r = run_script("benchmark.py", *TINY, "--precision", "bf16", "--dtype", "float64")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --precision bf16 times float32 models' steps: not with --memory, --freeze, --lora-rank or --dtype "
        "float64"]


def test_lora_step_races_the_full_step_and_peft():
    """--lora-rank: the LoRA step (adapters and head trained) beside the full step and PEFT's on torch; PEFT's
    whole-linear adapters only (q, v refused in one line)."""
    pytest.importorskip("peft")
    r = run_script("benchmark.py", *TINY, "--lora-rank", "4", "--lora-targets", "qkv,fc2", "--vs-torch", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["lora"]["targets"] == ["qkv", "fc2"] and out["hardware"]["cpu"] == features.cpu_name()
    # mnist preset: 6 blocks x 4 (64 + 192 + 128 + 64) adapter numbers, and the 10-class head
    assert out["trained_params"] == 6 * 4 * (64 + 192 + 128 + 64) + 64 * 10 + 10
    assert out["lora_step_ms"] > 0 and out["peft_step_ms"] > 0
    assert out["ratio_to_peft"] == out["lora_step_ms"] / out["peft_step_ms"]
    r = run_script("benchmark.py", *TINY, "--lora-rank", "4", "--lora-targets", "q,v", "--vs-torch")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: --lora-rank --vs-torch: PEFT adapts whole linears; name qkv, proj, fc1 or fc2")
