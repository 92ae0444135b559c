"""Hybrids as stock transformers sees them: generate() reuses the hybrid cache, and a saved hybrid loads (and runs
under the stock lm-eval CLI) with trust_remote_code in an interpreter that never imports hylo_lab."""

import ast
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hylo_lab import HyloCache, HyloConfig, HyloForCausalLM
from hylo_lab.hub import AUTO_MAP
from hylo_lab.model import CACHE_NAME

from conftest import tiny_config

ALL_FOUR = ("mla", "gdn", "mamba2", "attention")
# Put first in a child interpreter: any import of hylo_lab fails there, so the child proves it runs without it.
BLOCK_HYLO_LAB = textwrap.dedent("""
    import sys

    class BlockHyloLab:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "hylo_lab":
                raise ImportError("hylo_lab must not be imported here")

    sys.meta_path.insert(0, BlockHyloLab())
""")


def hybrid(mixers=ALL_FOUR, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = HyloForCausalLM(tiny_config(mixers)).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def record_input_lengths(model):
    lengths = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: lengths.append((kwargs.get("input_ids") if args == () else args[0]).shape[1]),
        with_kwargs=True)
    return lengths


def uncached_greedy(model, ids, mask, steps):
    """Greedy decoding by a full forward over the whole sequence at every step, no cache at all."""
    for _ in range(steps):
        logits = model(ids, attention_mask=mask, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


def transformers_warnings():
    """Records transformers' own log records (its logger does not propagate to pytest's caplog)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # an earlier test may already have used up a once-only warning
    return records, handler


# batch 2 with the second row left-padded by 3: positions and the mask must follow the cache too
@pytest.mark.parametrize("padded", [False, True], ids=["one_row", "left_padded"])
def test_generate_feeds_one_token_per_step(padded):
    model = hybrid()
    torch.manual_seed(1)
    ids = torch.randint(1, 97, (2, 10))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
    lengths = record_input_lengths(model)
    records, handler = transformers_warnings()
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert lengths == [10, 1, 1, 1, 1, 1]
    assert torch.equal(out, uncached_greedy(model, ids, mask, 6))
    assert not [r.getMessage() for r in records if "deprecated" in r.getMessage()]


def test_forward_takes_either_cache_name():
    model = hybrid(("mla", "gdn"))
    ids = torch.randint(0, 97, (1, 12))
    full = model(ids, use_cache=False).logits
    cache = getattr(model(ids[:, :8]), CACHE_NAME)
    step = model(ids[:, 8:9], cache=cache).logits
    step2 = model(ids[:, 9:10], past_key_values=cache).logits
    torch.testing.assert_close(torch.cat([step, step2], 1), full[:, 8:10], rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="not two different ones"):
        model(ids[:, 10:11], cache=cache, past_key_values=HyloCache(model.config))


def run_clean(script, tmp_path, *args, timeout=120):
    """Run `script` in a fresh interpreter with a bare environment, hylo_lab blocked and the hubs offline."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = dict(PATH=os.environ.get("PATH", "/usr/bin:/bin"), HOME=str(home), HF_HOME=str(home / "hf"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    res = subprocess.run([sys.executable, "-c", BLOCK_HYLO_LAB + textwrap.dedent(script), *map(str, args)],
                         cwd=home, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny float32 hybrid with every mixer type, saved with save_pretrained."""
    model = hybrid(dtype=torch.float32)
    path = tmp_path_factory.mktemp("saved") / "tiny-hylo"
    model.save_pretrained(path)
    return model, path


def test_saved_hybrid_names_its_code(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    for target in AUTO_MAP.values():
        assert (path / f"{target.split('.')[0]}.py").is_file()
    for file in path.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [getattr(node, "module", None) or ""] + [a.name for a in node.names]
                assert not [n for n in names if n.split(".")[0] == "hylo_lab"], (file.name, node.lineno)


def test_loads_without_hylo_lab(saved, tmp_path):
    model, path = saved
    ids = torch.randint(0, 97, (2, 21))
    torch.save(ids, tmp_path / "ids.pt")
    run_clean("""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        path, ids = sys.argv[1], torch.load(sys.argv[2])
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        assert type(config).__name__ == "HyloConfig" and config.mixers == ["mla", "gdn", "mamba2", "attention"]
        lengths = []
        hook = model.register_forward_pre_hook(lambda m, a, kw: lengths.append(kw["input_ids"].shape[1]),
                                               with_kwargs=True)
        out = model.generate(ids[:1, :9], max_new_tokens=3, do_sample=False)
        hook.remove()
        assert lengths == [9, 1, 1], lengths
        logits = model(ids).logits
        model.save_pretrained(sys.argv[4])  # the remote-code copy saves (and reloads) itself
        again = AutoModelForCausalLM.from_pretrained(sys.argv[4], trust_remote_code=True).eval()
        assert torch.equal(again(ids).logits, logits)
        torch.save(dict(logits=logits, generated=out), sys.argv[3])
        assert not [m for m in sys.modules if m.split(".")[0] == "hylo_lab"]
    """, tmp_path, path, tmp_path / "ids.pt", tmp_path / "out.pt", tmp_path / "resaved")
    got = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], model(ids).logits, rtol=0, atol=1e-6)
    assert torch.equal(got["generated"], model.generate(ids[:1, :9], max_new_tokens=3, do_sample=False))


def test_loads_as_the_package_class_with_hylo_lab(saved):
    _, path = saved
    assert type(AutoConfig.from_pretrained(path)) is HyloConfig
    assert type(AutoModelForCausalLM.from_pretrained(path)) is HyloForCausalLM


LM_EVAL_TASKS = {
    "hylo_tiny_mc": ([dict(question="Is the sky blue?", choices=["yes", "no"], label=0),
                      dict(question="Is fire cold?", choices=["yes", "no"], label=1)], """
        output_type: multiple_choice
        doc_to_text: "{{question}}"
        doc_to_choice: "{{choices}}"
        doc_to_target: "{{label}}"
        metric_list:
          - metric: acc
    """),
    "hylo_tiny_gen": ([dict(question="Is the sky blue?", answer="yes")], """
        output_type: generate_until
        doc_to_text: "Q: {{question}} A:"
        doc_to_target: " {{answer}}"
        generation_kwargs:
          until: ["?"]
          max_gen_toks: 4
          do_sample: false
        metric_list:
          - metric: exact_match
    """),
}


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   clean_up_tokenization_spaces=False)


def test_stock_lm_eval_cli_runs_a_saved_hybrid(tmp_path):
    pytest.importorskip("lm_eval")
    tok = byte_tokenizer()
    torch.manual_seed(0)
    path = tmp_path / "tiny-hylo"
    HyloForCausalLM(tiny_config(("mla", "gdn"), vocab_size=len(tok), max_position_embeddings=128)).save_pretrained(path)
    tok.save_pretrained(path)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, (rows, body) in LM_EVAL_TASKS.items():
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tasks / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                            f"    test: {tasks / name}.jsonl\ntest_split: test\n"
                                            + textwrap.dedent(body))
    out = tmp_path / "results"
    run_clean("""
        import runpy
        sys.argv = ["lm_eval", *sys.argv[1:]]
        runpy.run_module("lm_eval", run_name="__main__", alter_sys=True)
        assert not [m for m in sys.modules if m.split(".")[0] == "hylo_lab"]
    """, tmp_path, "--model", "hf", "--model_args", f"pretrained={path},trust_remote_code=True",
              "--tasks", ",".join(LM_EVAL_TASKS), "--include_path", tasks, "--batch_size", "2",
              "--output_path", out, timeout=180)
    results = [json.loads(p.read_text()) for p in out.rglob("results_*.json")]
    assert len(results) == 1 and set(results[0]["results"]) == set(LM_EVAL_TASKS)
    assert 0 <= results[0]["results"]["hylo_tiny_mc"]["acc,none"] <= 1
