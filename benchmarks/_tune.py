# temporary block-size sweep (deleted after tuning)
import itertools, sys, torch, triton.testing as tt
from loquetier.kernels import smlm_triton as K
dev, dt = "cuda", torch.bfloat16
offs = (0, 4096, 5120, 6144)
def case(lengths, nad):
    slots = [i % nad for i in range(len(lengths))]
    cu = [0]
    for l in lengths: cu.append(cu[-1] + l)
    ts = [s for s, l in zip(slots, lengths) for _ in range(l)]
    n = sum(lengths)
    return dict(x=torch.randn(n, 4096, device=dev, dtype=dt), a=torch.randn(8, 48, 4096, device=dev, dtype=dt)*0.02,
        b=torch.randn(8, 6144, 16, device=dev, dtype=dt)*0.2, sc=torch.ones(8, 3, device=dev), y=torch.randn(n, 6144, device=dev, dtype=dt),
        cu=torch.tensor(cu, dtype=torch.int32, device=dev), ss=torch.tensor(slots, dtype=torch.int32, device=dev),
        ts=torch.tensor(ts, dtype=torch.int32, device=dev), m=max(lengths))
def t(fn):
    fn(); torch.cuda.synchronize()
    return tt.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3
cases = {"dec1": case([1], 1), "dec32": case([1]*32, 4), "dec128": case([1]*128, 4), "pre4x512": case([512]*4, 4), "train2048": case([2048], 1), "mix": case([512]+[1]*64, 4)}
which = sys.argv[1]
S = lambda c, m: K.shrink(c["x"], c["a"], c["cu"], c["ss"], c["ts"], m)
if which == "gather":
    cases["dec8"] = case([1]*8, 4)
    for name in ["dec1", "dec8", "dec32", "dec128"]:
        c = cases[name]
        for bn, bk, waves in itertools.product([16, 32], [128, 256, 512], [0, 1, 2, 4]):
            K.SHRINK_GATHER_BLOCK_N_MAX, K.SHRINK_GATHER_BLOCK_K = bn, bk
            K.SHRINK_GATHER_SPLIT_K_MAX, K.SHRINK_GATHER_WAVES = (1, 1) if waves == 0 else (16, waves)
            print(name, "shrink_g", bn, bk, waves, round(t(lambda: S(c, 1)), 1), flush=True)
elif which == "shrink":
    for name in ["pre4x512", "train2048", "mix", "dec32"]:
        c = cases[name]
        for bm, bn, bk, w, st in itertools.product([32, 64, 128], [16, 32], [128, 256], [4, 8], [2, 3, 4]):
            K.SHRINK_BLOCK_M, K.SHRINK_BLOCK_N_MAX, K.SHRINK_BLOCK_K, K.SHRINK_NUM_WARPS, K.SHRINK_NUM_STAGES = bm, bn, bk, w, st
            try:
                r = round(t(lambda: S(c, max(2, c["m"]))), 1)
            except Exception as e:
                r = "ERR " + type(e).__name__
            print(name, "shrink_s", bm, bn, bk, w, st, r, flush=True)
else:
    cases["runs128"] = case([32]*4, 4)
    for name in ["pre4x512", "mix", "dec32", "runs128"]:
        c = cases[name]; v = S(c, 2)
        for bm, bn, tpp in itertools.product([16, 32, 64], [64, 128], [1, 4, 16]):
            K.EXPAND_BLOCK_M, K.EXPAND_BLOCK_N, K.EXPAND_COL_TILES_PER_PROGRAM = bm, bn, tpp
            print(name, "expand_s", bm, bn, tpp, round(t(lambda: K.expand_(c["y"], v, c["b"], c["sc"], offs, c["cu"], c["ss"], c["ts"], max(2, c["m"]))), 1), flush=True)
    for name in ["runs128"]:
        c = cases[name]
        for bm, bn, bk in itertools.product([16, 32, 64], [16, 32], [128, 256]):
            K.SHRINK_BLOCK_M, K.SHRINK_BLOCK_N_MAX, K.SHRINK_BLOCK_K = bm, bn, bk
            print(name, "shrink_s", bm, bn, bk, round(t(lambda: S(c, 32)), 1), flush=True)
