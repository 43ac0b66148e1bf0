"""Compile the Triton kernels for a Hopper GPU on any machine (no GPU needed): registers, spills, shared memory.

    python benchmarks/kernel_compile.py                 # the GPU launch tables of kernels/configs.py
    python benchmarks/kernel_compile.py sweep=fused     # every candidate block of the fused forward, per C
    python benchmarks/kernel_compile.py sweep=fused columns=128,256 out=...
    python benchmarks/kernel_compile.py sweep=cluster   # the clustered kernel's candidates, N = 32 and 128

Each kernel is specialised as a real call is (bf16, d = 4096, r = 16; unit strides constant, multiples of 16
marked; B stored by rows, so both factor stacks are packed), compiled by Triton for sm_90a and assembled by the ptxas that ships with Triton
(`ptxas -v`). A spill means local-memory traffic in the hot loop; blocks/SM is how many programs the register
file, shared memory and warp slots leave resident on one SM (65,536 registers, 227 KB, 64 warps). These are compile facts, not
timings: benchmarks/kernel_tune.py times the candidates on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"          # compile for the GPU, not for the interpreter

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_tune import CLUSTER_GRID, FUSED_GRID  # noqa: E402
from machine import machine  # noqa: E402

from adaptermix.kernels import configs, triton_cluster, triton_expand, triton_fused, triton_shrink  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
REGISTERS_PER_SM, SHARED_PER_SM, WARPS_PER_SM = 65536, 227 * 1024, 64
D, R, T, K = 4096, 16, 8192, 2


def ptxas() -> str:
    """Triton ships two: the newer one (ptxas-blackwell) reads the PTX version Triton emits."""
    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        if (folder / name).exists():
            return str(folder / name)
    raise FileNotFoundError(f"no ptxas in {folder}")


def compile_kernel(fn, args: dict, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    """args: name -> (type, value); an int equal to 1 is specialised to a constant, as Triton's JIT does."""
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name], constants[(i,)] = "constexpr", constexprs[name]
            continue
        kind, value = args[name]
        if kind.startswith("*"):
            signature[name], attrs[(i,)] = kind, [["tt.divisibility", 16]]
        elif value == 1:
            signature[name], constants[(i,)] = "constexpr", 1
        else:
            signature[name] = kind
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs),
                            target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(kernel.asm["ptx"])
        report = subprocess.run([ptxas(), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                                capture_output=True, text=True, check=True).stderr
    registers = spill = 0
    for line in report.splitlines():
        if "Used" in line and "registers" in line:
            registers = int(line.split("Used")[1].split()[0])
        if "spill stores" in line:
            spill = int(line.split("bytes spill stores")[0].split(",")[-1])
    shared = kernel.metadata.shared
    blocks = min(REGISTERS_PER_SM // max(1, registers * 32 * num_warps), SHARED_PER_SM // max(1, shared),
                 WARPS_PER_SM // num_warps)
    return dict(registers=registers, spill_bytes=spill, shared_bytes=shared, blocks_per_sm=blocks,
                num_warps=num_warps, num_stages=num_stages)


def pointers(dtype: str, *names: str, **typed: str) -> dict:
    return {**{n: (f"*{dtype}", None) for n in names}, **{n: (f"*{t}", None) for n, t in typed.items()}}


def ints(**values: int) -> dict:
    return {name: ("i32", value) for name, value in values.items()}


def fused_forward(C: int, block: tuple) -> dict:
    BM, BK, BN, warps, stages = block
    return compile_kernel(triton_fused._fused_kernel, forward_args(max(1, C // R)),
                          dict(BM=BM, BK=BK, BN=BN, C=C, A_PACKED=True, B_PACKED=True, PRECISION="tf32"), warps, stages)


def forward_args(N: int, **more_pointers: str) -> dict:
    """The arguments of the one-launch forward kernels (fused, clustered) for N adapters of rank R."""
    return {**pointers("bf16", "x_ptr", "a_ptr", "b_ptr", "out_ptr", "w_ptr", idx_ptr="i64", scales_ptr="fp32",
                       ranks_ptr="i32", **more_pointers),
            **ints(T=T, N=N, k=K, r_max=R, d_in=D, d_out=D, split=2, chunk=D // 2, stride_xt=D, stride_xd=1,
                   stride_an=R * D, stride_ar=D, stride_ad=1, stride_bn=R * D, stride_bo=1, stride_br=D, stride_ot=D,
                   stride_od=1, stride_it=K, stride_ik=1, stride_wt=K, stride_wk=1)}


def fused_dweights(C: int, block: tuple) -> dict:
    BM, BK, _, warps, stages = block
    args = {**pointers("bf16", "x_ptr", "a_ptr", "grad_ptr", "b_ptr", dw_ptr="fp32", idx_ptr="i64",
                       scales_ptr="fp32", ranks_ptr="i32"),
            **ints(T=T, N=max(1, C // R), k=K, r_max=R, d_in=D, d_out=D, stride_xt=D, stride_xd=1, stride_an=R * D,
                   stride_ar=D, stride_ad=1, stride_gt=D, stride_gd=1, stride_bn=R * D, stride_bo=1, stride_br=D,
                   stride_it=K, stride_ik=1)}
    return compile_kernel(triton_fused._fused_dweights_kernel, args,
                          dict(BM=BM, BK=BK, C=C, A_PACKED=True, B_PACKED=True, PRECISION="tf32"), warps, stages)


def cluster_forward(N: int, block: tuple, later: bool = False) -> dict:
    """The clustered kernel for N adapters of rank R: block = (C, BM, BK, BN, warps, stages); later = the
    launch of the passes after the first (rarely does work)."""
    C, BM, BK, BN, warps, stages = block
    constexprs = dict(BM=BM, BK=BK, BN=BN, G=C // R, RP=R, N_PAD=max(16, triton.next_power_of_2(N)),
                      PRECISION="tf32", LATER_PASSES=later)
    return compile_kernel(triton_cluster._cluster_kernel, forward_args(N, order_ptr="i32"), constexprs, warps, stages)


def plan_kernels() -> dict:
    """The grouped GEMM's shrink and expand (timed on an H100): the calibration of these numbers."""
    BM = configs.GPU_BLOCK_M[R]
    BK, warps, stages = configs.GPU_SHRINK[R]
    common = ints(N=32, k=K, cap=T + 32 * (BM - 1))
    shrink = compile_kernel(
        triton_shrink._shrink_kernel,
        {**pointers("bf16", "x_ptr", "a_ptr", "w_ptr", h_ptr="fp32", scales_ptr="fp32", ranks_ptr="i32",
                    sorted_ptr="i32", starts_ptr="i32", counts_ptr="i32"), **common,
         **ints(d_in=D, stride_xt=D, stride_xd=1, stride_an=R * D, stride_ar=D, stride_ad=1, stride_wt=K, stride_wk=1,
                stride_ht=R)},
        dict(HAS_COEF=True, BM=BM, BR=R, BK=BK, SEARCH_STEPS=6, PRECISION="tf32"), warps, stages)
    BN, warps, stages = configs.GPU_EXPAND[R]
    expand = compile_kernel(
        triton_expand._expand_kernel,
        {**pointers("bf16", "b_ptr", "out_ptr", h_ptr="fp32", sorted_ptr="i32", starts_ptr="i32", counts_ptr="i32"),
         **common, **ints(first_block=0, d_out=D, r_max=R, stride_ht=R, stride_bn=R * D, stride_bo=1, stride_br=D,
                          stride_ot=D, stride_od=1)},
        dict(BM=BM, BN=BN, BR=R, SEARCH_STEPS=6, PRECISION="tf32"), warps, stages)
    return dict(shrink=dict(BM=BM, BK=BK, **shrink), expand=dict(BM=BM, BN=BN, **expand))


def tables() -> dict:
    rows = {"plan": plan_kernels()}
    for C, block in configs.GPU_FUSED.items():
        BM, BK, BN = block[:3]
        rows[f"fused C={C}"] = dict(BM=BM, BK=BK, BN=BN, forward=fused_forward(C, block),
                                    dweights=fused_dweights(C, block))
        print(f"C={C:3d} {block}: forward {rows[f'fused C={C}']['forward']}", flush=True)
    block = configs.GPU_CLUSTER[R]
    for N in (32, configs.CLUSTER_MAX_ADAPTERS):
        rows[f"cluster N={N}"] = dict(C=block[0], BM=block[1], BK=block[2], BN=block[3], forward=cluster_forward(N, block),
                                      later_passes=cluster_forward(N, block, later=True))
        print(f"cluster N={N} {block}: {rows[f'cluster N={N}']['forward']}", flush=True)
    return rows


def sweep_fused(columns: str | None = None) -> list[dict]:
    rows = []
    for C in map(int, columns.split(",")) if columns else configs.GPU_FUSED:
        for block in FUSED_GRID["blocks"]:
            row = dict(C=C, BM=block[0], BK=block[1], BN=block[2], **fused_forward(C, block))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def sweep_cluster() -> list[dict]:
    rows = []
    for N in (32, 128):
        for block in CLUSTER_GRID["blocks"]:
            row = dict(N=N, C=block[0], BM=block[1], BK=block[2], BN=block[3], **cluster_forward(N, block))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(sweep: str | None = None, columns: str | None = None, out: str | None = None):
    result = dict(benchmark="kernel_compile", target="sm_90a", triton=triton.__version__, machine=machine(),
                  shapes=dict(dtype="bfloat16", d=D, r=R, T=T, k=K))
    if sweep == "fused":
        result["sweep"] = sweep_fused(columns)
    elif sweep == "cluster":
        result["sweep"] = sweep_cluster()
    else:
        result["tables"] = tables()
    name = f"kernel_compile_sweep_{sweep}_sm90.json" if sweep and sweep != "fused" else (
        "kernel_compile_sweep_sm90.json" if sweep else "kernel_compile_sm90.json")
    path = Path(out) if out else Path(__file__).resolve().parent / "results" / name
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(**dict(a.split("=", 1) for a in sys.argv[1:]))
