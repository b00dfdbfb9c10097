"""The `peft-kernels` command line: bad input gives one clear line and exit status 2 (no traceback), and
finetune / compare run end to end on a tiny local model folder and a JSON-lines dataset (the real default
model is exercised by the README's main job, not here: it takes minutes)."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers

from peft_kernels import cli

WORDS = ["Review:", "Sentiment:", "positive", "negative", "good", "bad", "film", "plot", "great", "awful", "the"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 2-layer LLaMA with a word-level tokenizer, saved as a HF folder."""
    path = tmp_path_factory.mktemp("tiny_model")
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", *WORDS, "\n"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<pad>")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    # 64 wide: bitsandbytes fails on layers narrower than its 64-element blocks (the peer rows use it).
    # 4 layers: S4's four layer groups need one each.
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(vocab), pad_token_id=1)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_data") / "reviews.jsonl"
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(64):
        label = i % 2
        words = ["good", "great"] if label else ["bad", "awful"]
        text = " ".join([words[torch.randint(2, (1,), generator=g).item()], "film", "the", "plot"])
        lines.append(json.dumps({"text": text, "label": label}))
    path.write_text("\n".join(lines))
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, "-P", "-m", "peft_kernels.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def test_unknown_method_is_a_usage_error():
    r = run_cli("finetune", "--method", "nope")
    assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr and "Traceback" not in r.stderr


def test_missing_model_path(tmp_path):
    r = run_cli("compare", "--model", tmp_path / "missing")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no such folder, and not a hub id" in r.stderr


def test_malformed_data(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good film", "label": 1}\n{"review": "no label"}\n')
    r = run_cli("compare", "--model", tiny_model, "--data", bad, "--methods", "lora")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "bad.jsonl:2: expected a JSON object with 'text' and 'label'" in r.stderr


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--batch", "x"), ("--test-size", "-3"), ("--lr", "0"),
                                         ("--lr", "nan")])
def test_bad_counts_and_rates_are_usage_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["compare", flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: must be" in capsys.readouterr().err


def test_too_few_training_examples_for_a_batch(tiny_model, tiny_data):
    # 64 examples: 60 for test leave 4 for training, fewer than a batch of 8
    args = ["--model", str(tiny_model), "--data", str(tiny_data), "--test-size", "60", "--batch", "8"]
    assert cli.main(["compare", *args]) == 2


def test_unknown_compare_method(tiny_model, tiny_data):
    assert cli.main(["compare", "--model", str(tiny_model), "--data", str(tiny_data), "--methods", "lora,xyz"]) == 2


def test_compare_and_finetune_end_to_end(tiny_model, tiny_data, tmp_path, capsys):
    args = ["--model", str(tiny_model), "--data", str(tiny_data), "--steps", "3", "--batch", "4",
            "--train-size", "40", "--test-size", "16", "--out", str(tmp_path)]
    assert cli.main(["compare", *args]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(tuple(f"| {m} |" for m in cli.METHODS))]
    assert len(rows) == len(cli.RUNS), out  # every run: ours and the peers
    assert (tmp_path / "compare.csv").read_text().count("\n") == len(cli.RUNS) + 1
    losses = (tmp_path / "losses.csv").read_text().splitlines()
    assert len(losses) == 3 + 1 and all(len(line.split(",")) == len(cli.RUNS) + 1 for line in losses)
    assert cli.main(["finetune", "--method", "qlora", *args]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert cli.main(["finetune", "--method", "child_d", *args]) == 0
    assert (tmp_path / "adapter" / "sparse_diff.safetensors").is_file()


def test_side_by_side_training_matches_training_alone(tiny_model, tiny_data, tmp_path):
    """compare steps a method's runs in turn; each run keeps its own generator state, so its dropout masks and
    losses are those of the same run trained alone (LoRA at dropout 0.1: ours draws Philox seeds and PEFT's
    nn.Dropout draws masks from torch's default generator)."""
    args = cli.build_parser().parse_args(["compare", "--model", str(tiny_model), "--data", str(tiny_data),
                                          "--steps", "4", "--batch", "4", "--train-size", "40", "--test-size", "8",
                                          "--out", str(tmp_path)])
    ctx = cli.load_context(args)
    runs = [r for r in cli.RUNS if r.method == "lora"]
    assert [r.impl for r in runs] == ["peft_kernels", "peft"]
    alone = [cli.run_side_by_side([run], ctx)[0]["losses"] for run in runs]
    torch.manual_seed(123)  # the outer generator state must not matter either
    together = [res["losses"] for res in cli.run_side_by_side(runs, ctx)]
    assert together == alone
    assert alone[0] != alone[1]  # the two implementations draw different masks: the check can fail


def test_methods_table(tiny_model, tmp_path, capsys):
    assert cli.main(["methods", "--model", str(tiny_model), "--encoder-layers", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = (tmp_path / "methods.csv").read_text().splitlines()
    assert len(lines) == len(cli._method_configs()) + 1
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in out.splitlines()
             if line.startswith("| ") and not line.startswith("| method")}
    assert len(cells) == len(cli._method_configs())
    # r=8 on q_proj and v_proj of 4 layers of width 64 with 2 of 4 heads for K/V: 8 * ((64+64) + (64+32)) * 4;
    # BERT: query and value (768 -> 768) of 4 layers, plus the trainable classifier head (768 * 2 + 2). HF PEFT's
    # count (third column of each model) is the same.
    causal, bert = f"{8 * (128 + 96) * 4:,}", f"{8 * 1536 * 2 * 4 + 768 * 2 + 2:,}"
    assert cells["lora (r=8)"][0] == cells["lora (r=8)"][2] == causal
    assert cells["lora (r=8)"][3] == cells["lora (r=8)"][5] == bert
    for name in ("ia3", "prompt tuning (l=20)", "p-tuning (l=20, MLP)", "prefix tuning (l=20)"):
        assert cells[name][0] == cells[name][2] and cells[name][3] == cells[name][5], (name, cells[name])
