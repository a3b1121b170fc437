"""PEFT's module selection (target_modules, exclude_modules, layers_to_transform, all-linear) against PEFT itself."""

import json
import shutil

import pytest
import torch
from helpers import FAMILIES, forward_all, hf_config, write_adapter, write_checkpoint

from loquetier import LLM
from loquetier.errors import AdapterError
from loquetier.lora.adapter import LoraSpec, load_peft_adapter, new_adapter
from loquetier.lora.targets import hf_module_names, projection_name
from loquetier.models.config import ModelArgs

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
FULL_NAMES = [f"model.layers.{i}.{b}.{m}" for i in range(3) for b, ms in
              (("self_attn", ATTN), ("mlp", ["gate_proj", "up_proj", "down_proj"])) for m in ms]

CONFIGS = {  # name: (layers of the base model, target_modules, extra LoraConfig fields)
    "full_paths": (2, ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "layers.1.self_attn.v_proj"], {}),
    "regex": (2, r".*\.(q_proj|up_proj)", {}),
    "regex_one_layer": (2, r"model\.layers\.1\.self_attn\.(k|o)_proj", {}),
    "exclude_list": (2, ATTN, {"exclude_modules": ["model.layers.0.self_attn.k_proj", "o_proj"]}),
    "exclude_regex": (2, "all-linear", {"exclude_modules": r".*\.0\.mlp\..*"}),
    "layers_int": (2, ATTN, {"layers_to_transform": 1}),
    "layers_list_pattern": (2, ["q_proj", "gate_proj"], {"layers_to_transform": [0], "layers_pattern": "layers"}),
    # an exact full name skips layers_to_transform in PEFT; a suffix does not
    "layers_exact_name": (2, ["model.layers.0.self_attn.q_proj", "v_proj"], {"layers_to_transform": [1]}),
    "all_linear_small": (2, "all-linear", {}),          # saved by PEFT as 14 full names
    # 20+ names: PEFT condenses them to suffixes first, so layers_to_transform then applies
    "condensed_with_layers": (3, FULL_NAMES, {"layers_to_transform": [1]}),
    "all_linear_condensed": (3, "all-linear", {}),      # saved by PEFT as the seven short names
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    return root, {n: write_checkpoint(root / f"base{n}", "llama", num_hidden_layers=n) for n in (2, 3)}


def peft_selected(peft_model) -> set[str]:
    from peft.tuners.lora import LoraLayer
    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("family", FAMILIES)
def test_module_names_are_transformers(family):
    import transformers as tf
    model = tf.AutoModelForCausalLM.from_config(hf_config(family))
    args = ModelArgs.from_hf_config(model.config.to_dict())
    assert hf_module_names(args) == [n for n, _ in model.named_modules() if n]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_peft_configs_select_and_compute_as_peft(bases, name):
    root, hf = bases
    layers, targets, extra = CONFIGS[name]
    path = root / name
    peft_model = write_adapter(hf[layers], path, 4, targets, seed=7, **extra)
    saved = json.loads((path / "adapter_config.json").read_text())
    args = ModelArgs.from_dir(root / f"base{layers}")
    weights = load_peft_adapter(path, args, max_rank=8)
    ours = {projection_name(layer, module) for layer, module in weights.modules}
    assert ours == peft_selected(peft_model), saved["target_modules"]

    llm = LLM(str(root / f"base{layers}"), max_loras=2, max_lora_rank=8, num_kv_blocks=64, block_size=4)
    llm.load_adapter(name, path)
    prompts = [list(range(3, 20)), [7, 100, 42, 9]]
    for prompt, logits in zip(prompts, forward_all(llm.engine, prompts, [name, name])):
        with torch.no_grad():
            ref = peft_model(input_ids=torch.tensor([prompt])).logits[0]
        assert (logits - ref).abs().max().item() <= 1e-4


def test_long_lists_of_full_names_are_condensed_on_load_as_peft_does(bases, tmp_path):
    """PEFT saves a condensed list, but a config written by hand (or another tool) may hold 20+
    full names with layers_to_transform: PEFT condenses them on load, and the layer filter applies."""
    import copy

    from peft import PeftModel
    root, hf = bases
    d = shutil.copytree(root / "condensed_with_layers", tmp_path / "hand")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["target_modules"] = FULL_NAMES
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf[3]), d).eval()
    weights = load_peft_adapter(d, ModelArgs.from_dir(root / "base3"), max_rank=8)
    assert {projection_name(layer, m) for layer, m in weights.modules} == peft_selected(peft_model)
    assert {layer for layer, _ in weights.modules} == {1}


def test_all_linear_as_peft_saves_it(bases):
    """PEFT writes all-linear out: as full names for a small model, as suffixes once there are 20+."""
    root, hf = bases
    small = json.loads((root / "all_linear_small" / "adapter_config.json").read_text())["target_modules"]
    big = json.loads((root / "all_linear_condensed" / "adapter_config.json").read_text())["target_modules"]
    assert sorted(small) == sorted(n for n in FULL_NAMES if ".2." not in n)
    assert sorted(big) == sorted(ATTN + ["gate_proj", "up_proj", "down_proj"])


@pytest.mark.parametrize("targets, match", [
    (["embed_tokens"], "model.embed_tokens"),
    (["q_proj", "lm_head"], "lm_head"),
])
def test_peft_adapters_on_other_modules_are_refused(bases, tmp_path, targets, match):
    root, hf = bases
    write_adapter(hf[2], tmp_path / "a", 4, targets)
    with pytest.raises(AdapterError, match=rf"{match}.*projections"):
        load_peft_adapter(tmp_path / "a", ModelArgs.from_dir(root / "base2"), max_rank=8)


@pytest.mark.parametrize("change, match", [
    ({"target_modules": r".*self_attn"}, "model.layers.0.self_attn'.*projections"),   # a whole block
    ({"target_modules": ["nothing_here"]}, "selects no projection"),
    ({"target_modules": None}, "target_modules is empty"),
    ({"target_modules": "q_proj(", "layers_to_transform": None}, "not a valid regular expression"),
    ({"layers_to_transform": [0], "target_modules": ".*q_proj"}, "cannot be used when target_modules is a regex"),
    ({"lora_bias": True}, "lora_bias"),
    ({"use_dora": True}, "DoRA"),
    ({"target_modules": ["q_proj"]}, "v_proj.*do not select"),                # the weights hold more than the config
    ({"target_modules": ["q_proj", "v_proj", "k_proj"]}, "no weights for"),    # the config asks for more
])
def test_configs_we_cannot_serve_get_a_clear_error(bases, tmp_path, change, match):
    root, hf = bases
    if not (root / "qv").exists():
        write_adapter(hf[2], root / "qv", 4, ["q_proj", "v_proj"])
    d = shutil.copytree(root / "qv", tmp_path / "x")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(change)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=match):
        load_peft_adapter(d, ModelArgs.from_dir(root / "base2"), max_rank=8)


def test_new_adapters_follow_the_same_selection_and_refuse_typos(bases):
    root, _ = bases
    args = ModelArgs.from_dir(root / "base2")
    spec = LoraSpec(r=2, target_modules=["q_proj", "down_proj"], layers_to_transform=[1])
    assert sorted(new_adapter(spec, args, max_rank=8).modules) == [(1, "down_proj"), (1, "q_proj")]
    assert len(new_adapter(LoraSpec(r=2, target_modules=["all-linear"]), args, 8).modules) == 14
    with pytest.raises(AdapterError, match=r"\['q_prj'\] match no module"):
        new_adapter(LoraSpec(r=2, target_modules=["q_proj", "q_prj"]), args, max_rank=8)


def test_packed_weights_are_views_of_one_buffer_in_module_order(bases):
    """The adapter manager keeps adapters packed: a swap copies `flat` as it is, which must hold
    every module's A then B in `modules` order, with the module tensors as views of it."""
    root, _ = bases
    args = ModelArgs.from_dir(root / "base2")
    weights = new_adapter(LoraSpec(r=4, target_modules="all-linear", rank_pattern={"o_proj": 2}), args, 8, seed=3)
    for a, b in weights.modules.values():
        b.normal_()
    packed = weights.packed()
    tensors = packed.tensors()
    assert torch.equal(packed.flat, torch.cat([t.reshape(-1) for t in weights.tensors()]))
    assert all(t.untyped_storage().data_ptr() == packed.flat.untyped_storage().data_ptr() for t in tensors)
    assert list(packed.modules) == list(weights.modules)
    for key, (a, b) in weights.modules.items():
        assert torch.equal(packed.modules[key][0], a) and torch.equal(packed.modules[key][1], b)
    mixed = new_adapter(LoraSpec(r=2, target_modules=["q_proj"]), args, 8)
    key = next(iter(mixed.modules))
    mixed.modules[key] = (mixed.modules[key][0].half(), mixed.modules[key][1])
    assert mixed.packed() is mixed   # tensors of two dtypes stay as they are
    assert packed.tensors_on(torch.device("cpu")) == tensors
    on_meta = packed.tensors_on(torch.device("meta"))   # a device other than the CPU: views of one copy of flat
    assert [t.shape for t in on_meta] == [t.shape for t in tensors]
    assert all(t.untyped_storage().nbytes() == packed.flat.untyped_storage().nbytes() for t in on_meta)
