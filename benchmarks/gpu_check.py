"""Correctness of the GPU path (Triton SMLM + paged attention + CUDA graphs) against HF + PEFT on the GPU.

Prints max errors and token agreement; exits non-zero on a mismatch. Run on the GPU machine:
`python benchmarks/gpu_check.py`.
"""

import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from helpers import forward_all, write_adapter, write_checkpoint  # noqa: E402

from loquetier import LLM, SamplingParams  # noqa: E402
from loquetier.engine.batch import IGNORE_INDEX, LossSegment  # noqa: E402

ADAPTERS = {"a": (8, ["q_proj", "v_proj"]), "b": (16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"]), "c": (4, ["gate_proj", "down_proj"])}


def main():
    root = Path(tempfile.mkdtemp())
    hf = write_checkpoint(root / "base", "qwen2", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024)
    peft = {n: write_adapter(hf, root / n, r, t, seed=i).cuda() for i, (n, (r, t)) in enumerate(ADAPTERS.items())}
    hf = hf.cuda()
    ok = True
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (3, 40, 17, 90, 1, 64)]
    names = ["a", "b", None, "c", "b", "a"]
    refs32 = []
    for p, n in zip(prompts, names):
        m = hf if n is None else peft[n]
        with torch.no_grad():
            refs32.append(m(input_ids=torch.tensor([p], device="cuda")).logits[0].float().cpu())
    # fold: the SMLM shrink folded into the base GEMM with fused consumers, or separate kernels
    for dtype, tol, fold in (("float32", 2e-3, "never"), ("float32", 2e-3, "always"), ("bfloat16", None, "always")):
        print(f"--- {dtype}, fold_shrink={fold}")
        llm = LLM(str(root / "base"), dtype=dtype, max_loras=4, max_lora_rank=16, block_size=16, num_kv_blocks=512,
                  lora_fold_shrink=fold)
        for n in ADAPTERS:
            llm.load_adapter(n, root / n)
        ours = forward_all(llm.engine, prompts, names)
        errs = []
        for p, n, lo in zip(prompts, names, ours):
            m = hf if n is None else peft[n]
            with torch.no_grad():
                ref = m(input_ids=torch.tensor([p], device="cuda")).logits[0].float().cpu()
            errs.append(((lo.float() - ref).norm() / ref.norm()).item())
        print(f"{dtype}: mixed-batch logits rel err vs PEFT in {dtype}: max {max(errs):.2e}")
        if dtype == "float32":
            ok &= max(errs) < tol
        else:
            # bf16 against the fp32 reference, beside PEFT's own bf16 error against it
            ours_err = max(((lo.float() - r).norm() / r.norm()).item() for lo, r in zip(ours, refs32))
            hf_err = 0.0
            for p, n, r in zip(prompts, names, refs32):
                m = copy.deepcopy(hf if n is None else peft[n]).to(torch.bfloat16)  # keep the fp32 models intact
                with torch.no_grad():
                    lo = m(input_ids=torch.tensor([p], device="cuda")).logits[0].float().cpu()
                hf_err = max(hf_err, ((lo - r).norm() / r.norm()).item())
                del m
            print(f"bfloat16 vs fp32 reference: ours {ours_err:.2e}, HF+PEFT bf16 {hf_err:.2e}")
            ok &= ours_err < 1.5 * hf_err + 1e-3
        n_new = 40
        outs = llm.generate(prompts, SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True), adapters=names)
        agree = []
        for p, n, o in zip(prompts, names, outs):
            m = hf if n is None else peft[n]
            ref = m.generate(input_ids=torch.tensor([p], device="cuda"), max_new_tokens=n_new, min_new_tokens=n_new,
                             do_sample=False)[0, len(p):].tolist()
            same = next((i for i, (x, y) in enumerate(zip(o.token_ids, ref)) if x != y), n_new)
            agree.append(same)
        print(f"{dtype}: greedy tokens identical before first divergence (of {n_new}): {agree}; "
              f"graphs captured: {len(llm.engine.runner.graphs.graphs) if llm.engine.runner.graphs else 0}")
        if dtype == "float32":
            ok &= min(agree) == n_new
        if dtype == "float32" and llm.engine.runner.graphs is not None:
            # the same requests without CUDA graphs give the same tokens
            llm.engine.runner.graphs, saved = None, llm.engine.runner.graphs
            eager = llm.generate(prompts, SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True), adapters=names)
            llm.engine.runner.graphs = saved
            same = all(a.token_ids == b.token_ids for a, b in zip(outs, eager))
            print(f"graphs vs eager identical tokens: {same}")
            ok &= same
        del llm
    # training gradients on the GPU (fp32) vs PEFT
    llm = LLM(str(root / "base"), dtype="float32", max_loras=4, max_lora_rank=16, num_kv_blocks=256)
    for n in ADAPTERS:
        llm.load_adapter(n, root / n)
    state = llm.engine.adapters.make_trainable("b")
    tokens = list(range(20, 120))
    targets = tokens[1:] + [IGNORE_INDEX]
    llm.engine.add_request([5, 6, 7], SamplingParams(max_tokens=1), "a")
    llm.engine.step([LossSegment(tokens, targets, "b", True, weight=1.0 / (len(tokens) - 1))])
    res = llm.engine.last_result
    grads = state.module_views(state.grad)
    m = peft["b"]
    m.zero_grad()
    out = m(input_ids=torch.tensor([tokens], device="cuda"), labels=torch.tensor([tokens], device="cuda"))
    out.loss.backward()
    worst = 0.0
    for name, p in m.named_parameters():
        if "lora_" in name:
            layer = int(name.split("layers.")[1].split(".")[0])
            module = name.split(".lora_")[0].rsplit(".", 1)[1]
            ours = grads[(layer, module)][0 if "lora_A" in name else 1]
            worst = max(worst, ((ours - p.grad).norm() / p.grad.norm().clamp_min(1e-12)).item())
    print(f"train grads rel err max {worst:.2e}; loss ours {float(res.loss_sums[0] / res.loss_counts[0]):.6f} "
          f"peft {out.loss.item():.6f}")
    ok &= worst < 1e-3
    print("GPU CHECK", "PASSED" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
