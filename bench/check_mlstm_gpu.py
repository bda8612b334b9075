"""GPU correctness of the Triton mLSTM against the float64 PyTorch reference.

Usage (on a CUDA machine, from the repo root):
    PYTHONPATH=kernels python bench/check_mlstm_gpu.py [--quick] [--out bench/results/mlstm_check_h100.md]

For bf16, fp16 and fp32 inputs, both gates, at every shape of the benchmark table (DH in 96/192/384/512, S in
196/1024/4096; batch 1, 2 heads: the batch does not change the arithmetic), at S = 16384 and at random shapes
(initial state, final state and chunk sizes included), it reports max relative error per tensor: h, the final
state and the gradients of q, k, v, i, f (and of the initial state), each as ||ours - ref|| / ||ref||, and
max|ours - ref| / max|ref|. Outputs are poisoned with NaN before each run, so an unwritten tile fails. It also checks
run-to-run determinism, torch.compile, autocast and torch.library.opcheck.

Which path: by default the op as shipped (the fused gate kernels everywhere); --fused forces them
(tfla.triton.function.FUSED_KERNELS = True) and adds a fused-vs-unfused comparison at the benchmark shapes (same
inputs, every output and gradient, relative L2 within the dtype's tolerance); --unfused takes the unfused path
everywhere. --skip-grid keeps only the random shapes and the extra checks (a few minutes less), --seq restricts the
grid's sequence lengths:
    PYTHONPATH=kernels python bench/check_mlstm_gpu.py --quick --fused
--dh and --dtypes restrict the grid's head dims and dtypes the same way.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time

import torch

from tfla import MLSTMState, mlstm, mlstm_chunkwise, mlstm_parallel
from tfla.triton import function, launch
from tfla.triton import mlstm_triton

# Relative L2 error allowed against float64 (bf16/fp16 inputs round the products' operands).
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-3}
NAMES = ["q", "k", "v", "i", "f", "C0", "n0", "m0"]


def make_inputs(B, NH, S, DQK, DHV, dtype, init, gen):
    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=gen, device="cuda") * scale + shift

    xs = [rnd(B, NH, S, DQK).to(dtype), rnd(B, NH, S, DQK).to(dtype), rnd(B, NH, S, DHV).to(dtype),
          rnd(B, NH, S, scale=2.0), rnd(B, NH, S, scale=1.5, shift=3.0)]
    if init:
        xs += [rnd(B, NH, DQK, DHV, scale=0.3), rnd(B, NH, DQK, scale=0.3), rnd(B, NH)]
    return xs


def run(fn, xs, gate, ret, weights, **kw):
    state = MLSTMState(*xs[5:8]) if len(xs) > 5 else None
    out = fn(*xs[:5], gate=gate, initial_state=state, return_state=ret, **kw)
    outs = [out[0], *out[1]] if ret else [out]
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    loss.backward()
    return [o.detach() for o in outs], [x.grad for x in xs]


def errors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    if a is None:
        return float("nan"), float("nan")
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf"), float("inf")
    d = (a - b).abs()
    scale = max(b.norm().item(), 1e-2 * math.sqrt(b.numel()))
    return (d.norm().item() / scale, d.max().item() / max(b.abs().max().item(), 1e-2))


def check_case(B, NH, S, DQK, DHV, gate, dtype, *, init=False, ret=False, chunk_size=None, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    xs = [x.requires_grad_() for x in make_inputs(B, NH, S, DQK, DHV, dtype, init, gen)]
    ref_xs = [x.detach().double().requires_grad_() for x in xs]
    shapes = [(B, NH, S, DHV)] + ([(B, NH, DQK, DHV), (B, NH, DQK), (B, NH)] if ret else [])
    weights = [torch.randn(s, generator=gen, device="cuda", dtype=torch.float64) for s in shapes]
    launch.POISON_OUTPUTS = True
    outs, grads = run(mlstm_triton, xs, gate, ret, weights, chunk_size=chunk_size)
    launch.POISON_OUTPUTS = False
    ref_fn = mlstm_parallel if S <= 4096 else (lambda *a, **k: mlstm_chunkwise(*a, chunk_size=2048, **k))
    ref_outs, ref_grads = run(ref_fn, ref_xs, gate, ret, weights)
    res = {}
    for name, a, b in zip(["h", "C", "n", "m"], outs, ref_outs):
        if not (name == "m" and gate == "sig"):
            res[name] = errors(a, b)
    for name, a, b in zip(NAMES, grads, ref_grads):
        if b is not None:
            res["d" + name] = errors(a, b)
    del xs, ref_xs, outs, grads, ref_outs, ref_grads
    torch.cuda.empty_cache()
    worst = max(v[0] for v in res.values())
    ok = worst <= TOL[dtype]
    return ok, res


def compare_fused_unfused(B, NH, S, DQK, DHV, gate, dtype, *, init=False, ret=False, chunk_size=None, seed=0):
    """Fused path vs the unfused path on the same inputs: relative errors of every output and gradient."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    xs = make_inputs(B, NH, S, DQK, DHV, dtype, init, gen)
    shapes = [(B, NH, S, DHV)] + ([(B, NH, DQK, DHV), (B, NH, DQK), (B, NH)] if ret else [])
    weights = [torch.randn(s, generator=gen, device="cuda", dtype=torch.float64) for s in shapes]
    runs = []
    for fused in (False, True):
        function.FUSED_KERNELS = fused
        launch.POISON_OUTPUTS = fused
        ys = [x.detach().clone().requires_grad_() for x in xs]
        runs.append(run(mlstm_triton, ys, gate, ret, weights, chunk_size=chunk_size))
    launch.POISON_OUTPUTS = False
    (outs_d, grads_d), (outs_f, grads_f) = runs
    res = {}
    for name, a, b in zip(["h", "C", "n", "m"], outs_f, outs_d):
        if not (name == "m" and gate == "sig"):
            res[name] = errors(a, b)
    for name, a, b in zip(NAMES, grads_f, grads_d):
        if b is not None and not (name == "m0" and gate == "sig"):
            res["d" + name] = errors(a, b)
    worst = max(v[0] for v in res.values())
    return worst <= TOL[dtype], res


def fmt(res):
    return " ".join(f"{k}={v[0]:.1e}" for k, v in res.items())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--random", type=int, default=8)
    ap.add_argument("--fused", action="store_true",
                    help="fused kernels everywhere (and compared with the unfused path)")
    ap.add_argument("--unfused", action="store_true", help="the unfused path everywhere (PyTorch gate bookkeeping)")
    ap.add_argument("--skip-grid", action="store_true", help="only the random shapes and the extra checks")
    ap.add_argument("--seq", type=int, nargs="+", default=[196, 1024, 4096, 16384],
                    help="grid sequence lengths to check (16384: two long single-head cases)")
    ap.add_argument("--dh", type=int, nargs="+", default=[96, 192, 384, 512], help="grid head dims to check")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"],
                    help="grid input dtypes to check (the random shapes draw from all three)")
    args = ap.parse_args()
    path = True if args.fused else False if args.unfused else function.FUSED_KERNELS
    which = ("fused path (forced)" if args.fused else "unfused path everywhere" if args.unfused
             else f"shipped default path ({'fused' if path else 'unfused'})")
    print(f"torch {torch.__version__}, GPU {torch.cuda.get_device_name()}, {which}", flush=True)
    function.FUSED_KERNELS = path
    rows, failures = [], 0
    cases = []
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    for dtype in ([] if args.skip_grid else [getattr(torch, name) for name in args.dtypes]):
        for gate in ("exp", "sig"):
            for DH in args.dh:
                for S in (196, 1024, 4096):
                    if S not in args.seq:
                        continue
                    if args.quick and (S == 4096 or DH in (192, 384)):
                        continue
                    if dtype != torch.bfloat16 and S == 4096 and DH != 192:
                        continue
                    cases.append(dict(B=1, NH=2, S=S, DQK=DH, DHV=DH, gate=gate, dtype=dtype))
    if not args.skip_grid and 16384 in args.seq:
        cases.append(dict(B=1, NH=1, S=16384, DQK=192, DHV=192, gate="exp", dtype=torch.bfloat16))
        cases.append(dict(B=1, NH=1, S=16384, DQK=96, DHV=96, gate="sig", dtype=torch.bfloat16))
    rng = random.Random(0)
    for r in range(args.random):
        cases.append(dict(
            B=rng.randint(1, 2), NH=rng.randint(1, 3), S=rng.choice([1, 7, 97, 197, 729, 784, 1500, 2500]),
            DQK=rng.choice([16, 24, 48, 96, 160, 192, 384, 512]), DHV=rng.choice([16, 32, 96, 200, 256, 512]),
            gate=rng.choice(["exp", "sig"]), dtype=rng.choice(dtypes), init=rng.random() < 0.6, ret=rng.random() < 0.7,
            chunk_size=rng.choice([None, None, 64, 100, 256, 1024]), seed=r + 1,
        ))
    for case in cases:
        t0 = time.time()
        function.FUSED_KERNELS = path
        ok, res = check_case(**case)
        failures += not ok
        label = " ".join(f"{k}={v}" for k, v in case.items() if k not in ("seed",)).replace("torch.", "")
        print(f"{'ok  ' if ok else 'FAIL'} {label} [{time.time() - t0:.1f}s] {fmt(res)}", flush=True)
        rows.append((label, ok, res))

    if args.fused:
        fused_cases = [dict(B=4, NH=4, S=S, DQK=DH, DHV=DH, gate=gate, dtype=torch.bfloat16)
                       for S in (196, 1024) for DH in (96, 192, 512) for gate in ("exp", "sig")]
        fused_cases += [dict(B=2, NH=2, S=4096, DQK=192, DHV=192, gate="exp", dtype=torch.bfloat16),
                        dict(B=2, NH=2, S=1500, DQK=96, DHV=128, gate="exp", dtype=torch.float16, init=True, ret=True,
                             chunk_size=256),
                        dict(B=2, NH=2, S=729, DQK=64, DHV=64, gate="sig", dtype=torch.float32, init=True, ret=True,
                             chunk_size=100)]
        for case in fused_cases:
            ok, res = compare_fused_unfused(**case)
            failures += not ok
            label = "fused vs unfused " + " ".join(f"{k}={v}" for k, v in case.items()).replace("torch.", "")
            print(f"{'ok  ' if ok else 'FAIL'} {label} {fmt(res)}", flush=True)
            rows.append((label, ok, res))
        function.FUSED_KERNELS = path

    # Determinism: bitwise equal outputs and gradients run to run at benchmark shapes, also under
    # torch.use_deterministic_algorithms(True) (which a user may set; no op of the path may refuse it).
    extra_checks = 0  # the checks after the shape rows, counted as they run
    gen = torch.Generator(device="cuda").manual_seed(5)
    for B, S, DH in ((8, 1024, 192), (16, 196, 96)):
        xs = make_inputs(B, 4, S, DH, DH, torch.bfloat16, False, gen)
        runs = []
        torch.use_deterministic_algorithms(True)
        try:
            for _ in range(2):
                ys = [x.detach().clone().requires_grad_() for x in xs]
                h = mlstm_triton(*ys, gate="exp")
                h.backward(torch.ones_like(h))
                runs.append([h] + [y.grad for y in ys])
        finally:
            torch.use_deterministic_algorithms(False)
        det = all(torch.equal(a, b) for a, b in zip(*runs))
        print(f"{'ok  ' if det else 'FAIL'} deterministic (bitwise, two runs, fwd+bwd, deterministic algorithms) "
              f"S={S} DH={DH}", flush=True)
        failures += not det
        extra_checks += 1

    # torch.compile (custom op: no graph break) and autocast (fp32 inputs, bf16 compute).
    gen = torch.Generator(device="cuda").manual_seed(6)  # own inputs, whatever the checks above drew
    xs = [x.float().requires_grad_() for x in make_inputs(2, 4, 197, 96, 96, torch.float32, False, gen)]

    def step(q, k, v, i, f):
        return mlstm(q, k, v, i, f, backend="triton").square().mean()

    eager = step(*xs)
    g_eager = torch.autograd.grad(eager, xs)
    compiled = torch.compile(step, fullgraph=True)
    out_c = compiled(*xs)
    g_c = torch.autograd.grad(out_c, xs)
    comp_ok = torch.allclose(eager, out_c, rtol=1e-5) and all(torch.allclose(a, b, rtol=1e-4, atol=1e-6)
                                                           for a, b in zip(g_eager, g_c))
    print(f"{'ok  ' if comp_ok else 'FAIL'} torch.compile(fullgraph=True) fwd+bwd matches eager", flush=True)
    failures += not comp_ok
    extra_checks += 1
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h_ac = mlstm(*xs, backend="triton")
    g_ac = torch.autograd.grad(h_ac.float().square().mean(), xs)
    # Against the float64 reference on the inputs as autocast hands them to the kernels (q, k, v rounded to bf16):
    # the rounding of fp32 inputs is autocast's, not the kernels', and it alone gave 2-4e-2 at these shapes.
    ref = mlstm_parallel(*(x.detach().to(torch.bfloat16).double() if n < 3 else x.detach().double()
                           for n, x in enumerate(xs)))
    ac_ok = h_ac.dtype == torch.bfloat16 and errors(h_ac, ref)[0] < 3e-2 and all(
        g.dtype == torch.float32 and torch.isfinite(g).all() for g in g_ac)
    print(f"{'ok  ' if ac_ok else 'FAIL'} autocast(bf16) with fp32 inputs: h {h_ac.dtype}, "
          f"err {errors(h_ac, ref)[0]:.1e}",
          flush=True)
    failures += not ac_ok
    extra_checks += 1
    from tfla.triton.function import mlstm_fwd_op

    q, k, v, i, f = (x.detach() for x in xs)
    # keep_scores: the forward's weights as an output too (launch.KEEP_SCORES; a call on the score-matrix path, e.g.
    # under TFLA_SCORE_MATRIX=1, keeps them), which the AOT-dispatch test compares element by element
    for keep in (False, True):
        extra_checks += 1
        try:
            torch.library.opcheck(mlstm_fwd_op, (q, k, v, i, f, None, None, None, True, True, 197, 1e-6, False, keep),
                                  test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
            print(f"ok   torch.library.opcheck (schema, fake tensor, aot dispatch), keep_scores={keep}", flush=True)
        except Exception as e:  # report, do not hide
            print(f"FAIL torch.library.opcheck keep_scores={keep}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            failures += 1

    if args.out:
        with open(args.out, "w") as fh:
            fh.write(f"# Triton mLSTM vs float64 reference on {torch.cuda.get_device_name()}\n\n")
            fh.write(f"torch {torch.__version__}. Relative L2 error ||ours-ref||/||ref|| per tensor "
                     f"(tolerance bf16 {TOL[torch.bfloat16]:.0e}, fp16 {TOL[torch.float16]:.0e}, "
                     f"fp32 {TOL[torch.float32]:.0e}); outputs poisoned with NaN before each run.\n\n")
            keys = ["h", "C", "n", "m", "dq", "dk", "dv", "di", "df", "dC0", "dn0", "dm0"]
            fh.write("| case | ok | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 2) + "\n")
            for label, ok, res in rows:
                cells = [f"{res[k][0]:.1e}" if k in res else "" for k in keys]
                fh.write(f"| {label} | {'yes' if ok else 'NO'} | " + " | ".join(cells) + " |\n")
            fh.write(f"\nDeterministic: {det}. torch.compile: {comp_ok}. autocast: {ac_ok}.\n")
    print(f"{failures} failure(s) in {len(rows) + extra_checks} checks", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
