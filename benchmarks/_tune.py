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
cases["runs128"] = case([32]*4, 4); cases["runs32"] = case([8]*4, 4); cases["dec8"] = case([1]*8, 4)
for name in ["dec1", "dec8", "dec32", "dec128"]:
    c = cases[name]
    for bk, waves in itertools.product([256, 512], [0, 1, 2, 4]):
        K.SHRINK_GATHER_BLOCK_K, K.SHRINK_WAVES = bk, waves
        print(name, "shrink_g", bk, waves, round(t(lambda: S(c, 1)), 1), flush=True)
for name in ["pre4x512", "train2048", "mix", "runs128", "runs32", "dec32"]:
    c = cases[name]
    for bm, bn, bk, waves in itertools.product([16, 32, 64], [16, 32], [64, 128, 256], [0, 1, 2, 4]):
        K.SHRINK_BLOCK_M, K.SHRINK_BLOCK_N_MAX, K.SHRINK_BLOCK_K, K.SHRINK_WAVES = bm, bn, bk, waves
        try:
            r = round(t(lambda: S(c, max(2, c["m"]))), 1)
        except Exception as e:
            r = 999
        print(name, "shrink_s", bm, bn, bk, waves, r, flush=True)
