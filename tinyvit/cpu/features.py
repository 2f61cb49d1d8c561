"""What this CPU can do and which BLAS runs NumPy's matmuls: the line a benchmark figure carries.

CPU features come from /proc/cpuinfo's flags (Linux); elsewhere they are unknown (None), never guessed.
The BLAS comes from threadpoolctl where it is installed (its internal_api, version and the kernel
OpenBLAS picked for this CPU), else it is said to be unknown.
"""
import os

# the features a reader needs to tell which figure is theirs, and the cpuinfo flag that shows each
FEATURES = (("avx2", "AVX2", "avx2"), ("avx512", "AVX-512", "avx512f"),
            ("avx512_bf16", "AVX512-BF16", "avx512_bf16"), ("amx_bf16", "AMX-BF16", "amx_bf16"))
_CPUINFO = "/proc/cpuinfo"


def _cpuinfo_fields(path=_CPUINFO):
    """The first processor's 'key: value' fields of /proc/cpuinfo, or None where there is none."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    fields = {}
    for line in text.split("\n\n")[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_features(path=_CPUINFO):
    """{feature: True/False} from /proc/cpuinfo's flags; every value None where they cannot be read."""
    fields = _cpuinfo_fields(path)
    flags = set(fields.get("flags", "").split()) if fields else None
    return {key: (flag in flags if flags else None) for key, _, flag in FEATURES}


def cpu_name(path=_CPUINFO):
    """The CPU's model name (x86 'model name', or ARM's 'Hardware'/'CPU part'), or 'unknown CPU'."""
    fields = _cpuinfo_fields(path) or {}
    return fields.get("model name") or fields.get("Hardware") or "unknown CPU"


def cpu_vendor(path=_CPUINFO):
    """The CPU's vendor_id ('GenuineIntel', 'AuthenticAMD'), or None where /proc/cpuinfo has none."""
    return (_cpuinfo_fields(path) or {}).get("vendor_id")


def blas_libraries():
    """[{internal_api, version, architecture, num_threads, numpy}] of each BLAS loaded here (threadpoolctl), or None."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    keys = ("internal_api", "version", "architecture", "num_threads")
    libs = [dict({k: i.get(k) for k in keys}, numpy="numpy" in i.get("filepath", ""))
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return sorted(libs, key=lambda b: not b["numpy"])  # NumPy's own first


def _blas_words(libs):
    """'openblas 0.3.31 (kernel SkylakeX, 2 threads)' for each BLAS, or what to install to see it."""
    if libs is None:
        return "unknown (pip install threadpoolctl to see it)"
    words = [f"{b['internal_api']} {b['version']} ({'NumPy, ' if b['numpy'] else ''}kernel {b['architecture'] or 'n/a'}, "
             f"{b['num_threads']} threads)" for b in libs]
    return "; ".join(words) or "none found"


def hardware(bf16=None, **rivals):
    """The CPU, its features, NumPy's BLAS, the OpenBLAS variables set, (given) the bf16 GEMM and what a rival
    (torch=...) runs on: a dict."""
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("OPENBLAS_") and k != "OPENBLAS_THREAD_TIMEOUT"}
    out = {"cpu": cpu_name(), "cores": os.cpu_count(), "features": cpu_features(), "blas": blas_libraries(),
           "openblas_env": env}
    if bf16 is not None:
        out["bf16_gemm"] = bf16
    if rivals:
        out["rivals"] = rivals
    return out


def hardware_line(info):
    """hardware()'s dict in one line: 'cpu: NAME (N cores): AVX2 yes, ... | BLAS: ... | bf16 GEMM: ...'."""
    yes = {True: "yes", False: "no", None: "unknown"}
    feats = ", ".join(f"{label} {yes[info['features'][key]]}" for key, label, _ in FEATURES)
    line = f"cpu: {info['cpu']} ({info['cores']} cores): {feats} | BLAS: {_blas_words(info['blas'])}"
    if info["openblas_env"]:
        line += " [" + " ".join(f"{k}={v}" for k, v in info["openblas_env"].items()) + "]"
    if "bf16_gemm" in info:
        line += f" | bf16 GEMM: {info['bf16_gemm']}"
    return line + "".join(f" | {name}: {what}" for name, what in info.get("rivals", {}).items())
