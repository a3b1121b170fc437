"""Multi-LoRA correctness against PEFT: mixed batches, generation, training grads, adapter I/O."""

import json
import shutil

import pytest
import torch
from helpers import forward_all, write_adapter, write_checkpoint

from loquetier import LLM, SamplingParams
from loquetier.engine.batch import IGNORE_INDEX, LossSegment
from loquetier.errors import AdapterError, AdapterNotFoundError

ADAPTERS = {  # name: (rank, targets, alpha, rslora)
    "a": (4, ["q_proj", "v_proj"], 8, False),
    "b": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 16, False),
    "c": (16, ["gate_proj", "down_proj", "o_proj"], 8, True),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    hf = write_checkpoint(root / "base", "qwen2")  # q/k/v bias + tied embeddings
    peft_models = {}
    for i, (name, (r, targets, alpha, rs)) in enumerate(ADAPTERS.items()):
        peft_models[name] = write_adapter(hf, root / name, r, targets, alpha, seed=10 + i, use_rslora=rs)
    return root, hf, peft_models


def make_llm(root, **kw):
    kw.setdefault("num_kv_blocks", 512)
    kw.setdefault("block_size", 4)
    kw.setdefault("dtype", "float32")   # the references are float32 (on a GPU "auto" would be bfloat16)
    llm = LLM(str(root / "base"), max_loras=4, max_lora_rank=16, **kw)
    for name in ADAPTERS:
        llm.load_adapter(name, root / name)
    return llm


def ref_logits(model, prompt):
    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt])).logits[0]


@pytest.mark.parametrize("fold,backend", [("never", "auto"), ("always", "auto"), ("never", "triton"),
                                          ("always", "triton")])
def test_mixed_batch_logits_match_peft(setup, fold, backend, monkeypatch):
    """backend "triton": the SMLM and rotary kernels (interpreted on a CPU), which skip each slot's
    zero padding past its rank (ranks 4, 8 and 16 in a rank-16 table); with the shrink folded, the
    rotary kernel adds q/k/v's delta (tiles of 16 prompt tokens holding several adapters), and the
    whole prompts' attention reads the values it wrote."""
    root, hf, peft_models = setup
    llm = make_llm(root, lora_fold_shrink=fold, lora_backend=backend)
    llm.engine.model.rotary.backend = backend
    g = torch.Generator().manual_seed(3)
    names = ["a", None, "b", "c", "a", None, "c", "b"]
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 11, 1, 23, 9, 2, 17, 30)]
    from loquetier.kernels import rotary_triton
    fused_rotary = []
    real = rotary_triton.rotary_lora_forward_and_cache
    monkeypatch.setattr(rotary_triton, "rotary_lora_forward_and_cache", lambda *a: fused_rotary.append(1) or real(*a))
    ours = forward_all(llm.engine, prompts, names)
    triton_kernels = backend == "triton" or torch.device(llm.engine.device).type == "cuda"   # "auto" on a GPU
    assert bool(fused_rotary) == (fold == "always" and triton_kernels)
    for p, name, logits in zip(prompts, names, ours):
        ref = ref_logits(hf if name is None else peft_models[name], p)
        assert (logits - ref).abs().max().item() <= 1e-4, name


@pytest.mark.parametrize("fold", ["never", "always"])
def test_greedy_generation_matches_peft_across_many_blocks(setup, fold):
    root, hf, peft_models = setup
    llm = make_llm(root, block_size=2, lora_fold_shrink=fold)
    g = torch.Generator().manual_seed(4)
    names = ["a", "b", None, "c", "b", "a"]
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (3, 17, 8, 29, 1, 12)]
    n_new = 44
    outs = llm.generate(prompts, SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True), adapters=names)
    for p, name, out in zip(prompts, names, outs):
        model = hf if name is None else peft_models[name]
        ref = model.generate(input_ids=torch.tensor([p]), max_new_tokens=n_new, min_new_tokens=n_new,
                             do_sample=False)[0, len(p):].tolist()
        assert out.token_ids == ref, name
    assert llm.engine.kv.allocator.num_free == llm.engine.kv.num_blocks


def test_training_segment_grads_match_peft(setup, tmp_path):
    root, hf, peft_models = setup
    llm = make_llm(root)
    eng = llm.engine
    state = eng.adapters.make_trainable("b")
    tokens = list(range(20, 52))
    targets = tokens[1:] + [IGNORE_INDEX]
    targets[:5] = [IGNORE_INDEX] * 5   # prompt part without loss
    # inference for two other adapters and the base ride in the same forward
    infer_prompts = [[7, 8, 9, 10], list(range(60, 75)), [33, 34]]
    infer_names = ["a", "c", None]
    for p, n in zip(infer_prompts, infer_names):
        eng.add_request(p, SamplingParams(max_tokens=1, temperature=0), n)
    # the step's backward runs inside it: the segment's weight makes its loss the mean token CE
    n_targets = sum(t != IGNORE_INDEX for t in targets)
    seg = LossSegment(tokens, targets, "b", train=True, weight=1.0 / n_targets)
    ev = LossSegment(tokens[:10], tokens[1:10] + [IGNORE_INDEX], "a", train=False)
    outs = eng.step([seg, ev], keep_logits=True)
    res = eng.last_result
    loss = res.loss_sums[0] / res.loss_counts[0]
    grads = state.module_views(state.grad)

    # reference: PEFT with the same adapter, trainable, on the same tokens and labels
    ref_model = peft_models["b"]
    ref_model.zero_grad()
    labels = torch.tensor([[IGNORE_INDEX] + targets[:-1]])
    with torch.enable_grad():
        ref = ref_model(input_ids=torch.tensor([tokens]), labels=labels)
        ref.loss.backward()
    assert torch.allclose(loss.detach(), ref.loss.detach(), rtol=1e-4)
    checked = 0
    for name, p in ref_model.named_parameters():
        if "lora_A" not in name and "lora_B" not in name:
            continue
        layer = int(name.split("layers.")[1].split(".")[0])
        module = name.split(".lora_")[0].rsplit(".", 1)[1]
        ours = grads[(layer, module)][0 if "lora_A" in name else 1].cpu()   # the engine may run on a GPU
        torch.testing.assert_close(ours, p.grad, rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked == 2 * 7 * 2
    # eval segment loss equals PEFT "a" without touching grads of "a" (not trainable)
    ev_loss = res.loss_sums[1] / res.loss_counts[1]
    ref_ev = peft_models["a"](input_ids=torch.tensor([tokens[:10]]), labels=torch.tensor([tokens[:10]])).loss
    assert torch.allclose(ev_loss.detach(), ref_ev.detach(), rtol=1e-4)
    # inference logits in the same forward are right
    by_id = {o.request_id: o for o in outs}
    assert len(by_id) == 3
    for i, (p, n) in enumerate(zip(infer_prompts, infer_names)):
        ref_l = ref_logits(hf if n is None else peft_models[n], p)[-1]
        assert (res.logits[i].cpu() - ref_l).abs().max().item() <= 1e-4
    # only the trained adapter's slot has training state
    for vl_table in eng.adapters.layers:
        for vl in set(vl_table.values()):
            assert set(vl.train_slots) == {eng.adapters.get("b").slot}


def test_save_roundtrip_with_peft(setup, tmp_path):
    root, hf, peft_models = setup
    from peft import PeftModel

    from loquetier.lora.adapter import save_peft_adapter
    llm = make_llm(root)
    state = llm.engine.adapters.make_trainable("c")
    with torch.no_grad():  # change the weights so the round trip is not trivially the input file
        for a, b in state.module_views(state.master).values():
            a.mul_(1.5)
            b.add_(0.01)
    state.publish()
    save_peft_adapter(llm.engine.adapters.snapshot("c"), tmp_path / "saved", str(root / "base"))
    import copy
    loaded = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "saved").eval()
    prompt = list(range(40, 70))
    ours = forward_all(llm.engine, [prompt], ["c"])[0]
    assert (ours - ref_logits(loaded, prompt)).abs().max().item() <= 1e-4
    # and loads back into Loquetier
    llm.load_adapter("c2", tmp_path / "saved")
    assert (forward_all(llm.engine, [prompt], ["c2"])[0] - ours).abs().max().item() <= 1e-5


def _copy(root, name, dst):
    shutil.copytree(root / name, dst)
    return dst


def test_bad_adapters_are_rejected_and_engine_keeps_serving(setup, tmp_path):
    root, hf, _ = setup
    llm = make_llm(root)
    before = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0), adapters=["a"])[0].token_ids

    with pytest.raises(AdapterError, match="does not exist"):
        llm.load_adapter("x", tmp_path / "missing")
    d = _copy(root, "a", tmp_path / "pickle")
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(AdapterError, match="pickle"):
        llm.load_adapter("x", d)
    other = write_checkpoint(tmp_path / "other", "qwen2", hidden_size=32, intermediate_size=64)
    write_adapter(other, tmp_path / "wrongshape", 4, ["q_proj"])
    with pytest.raises(AdapterError, match="do not fit"):
        llm.load_adapter("x", tmp_path / "wrongshape")
    write_adapter(hf, tmp_path / "bigrank", 32, ["q_proj"])
    with pytest.raises(AdapterError, match="max_lora_rank"):
        llm.load_adapter("x", tmp_path / "bigrank")
    d = _copy(root, "a", tmp_path / "badtarget")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "c_attn"]   # as in PEFT, c_attn selects nothing: v_proj's weights are stray
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="v_proj.*do not select"):
        llm.load_adapter("x", d)
    with pytest.raises(AdapterError, match="already loaded"):
        llm.load_adapter("a", root / "b")
    d = _copy(root, "a", tmp_path / "corrupt")
    (d / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="cannot read"):
        llm.load_adapter("x", d)
    with pytest.raises(AdapterNotFoundError):
        llm.generate([[1, 2]], SamplingParams(max_tokens=2), adapters=["nope"])

    assert "x" not in llm.engine.adapters
    # unloading an adapter that queued requests still need is refused, not a stuck engine
    from loquetier.errors import AdapterInUseError
    rid = llm.engine.add_request([5, 6, 7], SamplingParams(max_tokens=2), "b")
    with pytest.raises(AdapterInUseError):
        llm.unload_adapter("b")
    llm.engine.abort(rid)
    after = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0), adapters=["a"])[0].token_ids
    assert after == before


@pytest.mark.parametrize("backend", ["auto", "triton"])   # triton: slot ranks follow every swap
def test_more_adapters_than_slots_swap_correctly(setup, tmp_path, backend):
    root, hf, peft_models = setup
    llm = LLM(str(root / "base"), max_loras=2, max_lora_rank=16, block_size=4, num_kv_blocks=256,
              dtype="float32", lora_backend=backend)
    for name in ADAPTERS:
        llm.load_adapter(name, root / name)
    prompts = [[9, 8, 7, 6], list(range(30, 45)), [120, 121]]
    n_new = 6
    expected = {}
    for p in prompts:
        for name in ADAPTERS:
            expected[(tuple(p), name)] = peft_models[name].generate(
                input_ids=torch.tensor([p]), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False
            )[0, len(p):].tolist()
    # 3 adapters, 2 slots: requests for all three at once must queue and swap, staying exact
    reqs = [(p, n) for p in prompts for n in ADAPTERS]
    outs = llm.generate([p for p, _ in reqs], SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True),
                        adapters=[n for _, n in reqs])
    for (p, n), o in zip(reqs, outs):
        assert o.token_ids == expected[(tuple(p), n)], n
    # round-robin single requests force evictions every time
    for _ in range(2):
        for name in ["c", "a", "b"]:
            o = llm.generate([prompts[0]], SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True),
                             adapters=[name])[0]
            assert o.token_ids == expected[(tuple(prompts[0]), name)]
    assert sum(r.slot is not None for r in llm.engine.adapters.records.values()) == 2
