"""tinyvit.cpu.features: the CPU's features from /proc/cpuinfo (unknown elsewhere, never guessed), the BLAS
threadpoolctl sees, and the one line a benchmark figure carries."""
import sys

import numpy as np

from tinyvit.cpu import features

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile
"""


def test_features_from_cpuinfo_flags(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text(CPUINFO)
    assert features.cpu_features(f) == {"avx2": True, "avx512": True, "avx512_bf16": True, "amx_bf16": True}
    assert features.cpu_name(f) == "Intel(R) Xeon(R) Platinum 8480+"
    f.write_text(CPUINFO.replace(" avx512f avx512bw avx512_bf16 amx_bf16 amx_tile", ""))
    assert features.cpu_features(f) == {"avx2": True, "avx512": False, "avx512_bf16": False, "amx_bf16": False}


def test_features_unknown_without_cpuinfo(tmp_path):
    """No /proc/cpuinfo (macOS, Windows): every feature unknown, and the line says so."""
    missing = tmp_path / "none"
    assert features.cpu_features(missing) == dict.fromkeys(("avx2", "avx512", "avx512_bf16", "amx_bf16"))
    assert features.cpu_name(missing) == "unknown CPU"
    info = {"cpu": "unknown CPU", "cores": 4, "features": features.cpu_features(missing), "blas": None,
            "openblas_env": {}}
    line = features.hardware_line(info)
    assert line == ("cpu: unknown CPU (4 cores): AVX2 unknown, AVX-512 unknown, AVX512-BF16 unknown, AMX-BF16 unknown"
                    " | BLAS: unknown (pip install threadpoolctl to see it)")


def test_line_names_the_kernel_the_variables_and_the_bf16_gemm(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    info = features.hardware("oneMKL 2026.2.1 cblas_gemm_bf16bf16f32, native", torch="2.13.0 (CPU capability AVX512)")
    info["features"] = {"avx2": True, "avx512": True, "avx512_bf16": False, "amx_bf16": False}
    info["blas"] = [{"internal_api": "openblas", "version": "0.3.31", "architecture": "Haswell", "num_threads": 2,
                     "numpy": True}]
    line = features.hardware_line(info)
    assert "\n" not in line and line.startswith(f"cpu: {features.cpu_name()} (")
    assert ": AVX2 yes, AVX-512 yes, AVX512-BF16 no, AMX-BF16 no | BLAS: openblas 0.3.31 (NumPy, kernel Haswell, 2 threads)" \
           " [OPENBLAS_CORETYPE=Haswell] | bf16 GEMM: oneMKL 2026.2.1 cblas_gemm_bf16bf16f32, native" \
           " | torch: 2.13.0 (CPU capability AVX512)" in line


def test_numpys_blas_first_or_unknown_without_threadpoolctl(monkeypatch):
    np.ones((2, 2)) @ np.ones((2, 2))
    libs = features.blas_libraries()
    if libs is not None:  # the test extra installs threadpoolctl
        assert libs and libs[0]["numpy"] and libs[0]["internal_api"]
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import fails
    assert features.blas_libraries() is None
