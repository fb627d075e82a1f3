"""The ``upop-fx`` command, driven as a user would: the documented commands (docs/cli.md), then checks on what
they wrote."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import upop_fx
from upop_fx.cli import SAMPLE_TEXT, text_batches
from upop_fx.datasets import load_minilm, minilm_path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _documented_commands() -> str:
    text = (ROOT / "docs" / "cli.md").read_text()
    section = text.split("## From the command line", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Run the documented command-line block in a fresh directory."""
    d = tmp_path_factory.mktemp("cli")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", _documented_commands()], cwd=d, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d, proc.stdout


def test_documented_commands_write_every_artifact(workdir):
    d, stdout = workdir
    expected = [*upop_fx.artifacts.FILES, upop_fx.artifacts.PRETRAINED]
    assert sorted(p.name for p in (d / "small").iterdir()) == sorted(expected)
    assert "onnxruntime-cpu" in stdout and "speedup" in stdout
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_saved_model_equals_in_process_compress(workdir):
    d, _ = workdir
    model, tokenizer = load_minilm()
    example = text_batches(tokenizer, SAMPLE_TEXT, 32, 8)[0]
    expected = upop_fx.compress(model, example, 0.5, "magnitude", retrain_steps=0).model
    loaded = upop_fx.load(d / "small")
    other = text_batches(tokenizer, SAMPLE_TEXT[::-1] * 2, 20, 3)[0]
    with torch.no_grad():
        for inputs in (example, other):
            torch.testing.assert_close(loaded(**inputs).last_hidden_state, expected(**inputs).last_hidden_state,
                                       rtol=1e-5, atol=1e-5)


def test_pretrained_is_the_model_of_its_own_class_with_its_tokenizer(workdir):
    from transformers import AutoTokenizer, BertModel

    d, _ = workdir
    module, graph = upop_fx.load(d / "small"), upop_fx.load(d / "small", graph=True)
    assert type(module) is BertModel and isinstance(graph, torch.fx.GraphModule)
    tokenizer = AutoTokenizer.from_pretrained(str(d / "small" / "pretrained"), local_files_only=True)
    batch = text_batches(tokenizer, SAMPLE_TEXT, 24, 3)[0]
    with torch.no_grad():
        torch.testing.assert_close(module(**batch).last_hidden_state, graph(**batch).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


def _word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[BOS]": 1, "[UNK]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]")


def test_generate_command_continues_a_prompt(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from upop_fx.cli import main

    words = sorted({w.strip(".,").lower() for t in SAMPLE_TEXT for w in t.split()})
    tokenizer = _word_tokenizer(words)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                       initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=1)).eval()
    example = tokenizer([t.lower() for t in SAMPLE_TEXT[:2]], padding=True, return_tensors="pt")
    result = upop_fx.compress(model, dict(example), 0.5, "magnitude", retrain_steps=0)
    upop_fx.save_pretrained(result.module, tmp_path / "gpt", tokenizer=tokenizer)
    assert main(["generate", str(tmp_path / "gpt"), "--prompt", "the markets rallied", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip()
    ids = tokenizer("the markets rallied", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = result.module.generate(ids, max_new_tokens=6, do_sample=False)
    assert want.shape[1] > 3 and printed == tokenizer.decode(want[0], skip_special_tokens=True)
    assert printed.startswith("the markets rallied")
    upop_fx.save_pretrained(result.module, tmp_path / "bare")
    assert main(["generate", str(tmp_path / "bare"), "--prompt", "the"]) == 1
    assert "holds no tokenizer" in capsys.readouterr().err


def test_own_class_leaves_inexpressible_attention_whole(tmp_path, capsys):
    from upop_fx.cli import main

    argv = ["compress", "tests.scaleout:build", "--ratio", "0.3", "--out", str(tmp_path / "o"), "--method",
            "magnitude", "--retrain-steps", "0", "--no-onnx"]
    assert main(argv) == 0  # own_class=True is the default
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert {g["kind"] for g in report["groups"]} == {"mlp"} and report["module_reason"] is None
    assert any("left whole" in line and "MultiheadAttention" in line for line in report["class_limits"])
    assert main([*argv, "--no-own-class", "--force"]) == 0  # the attention is pruned and only the graph comes back
    assert "no pretrained/" in capsys.readouterr().out


def test_onnx_runs_in_onnxruntime(workdir):
    import onnxruntime as ort

    d, _ = workdir
    sess = ort.InferenceSession(str(d / "small" / "model.onnx"), providers=["CPUExecutionProvider"])
    _, tokenizer = load_minilm()
    batch = text_batches(tokenizer, SAMPLE_TEXT, 24, 3)[0]
    out = sess.run(None, {i.name: batch[i.name].numpy() for i in sess.get_inputs()})
    ref = upop_fx.load(d / "small")(**batch).last_hidden_state.detach().numpy()
    assert np.linalg.norm(out[0] - ref) / np.linalg.norm(ref) < 1e-4


def test_report_json_matches_markdown(workdir):
    d, _ = workdir
    report = json.loads((d / "small" / "report.json").read_text())
    md = (d / "small" / "report.md").read_text()
    assert f"| parameters | {report['params_before']} | {report['params_after']} |" in md
    assert f"| FLOPs | {report['flops_before']} | {report['flops_after']} |" in md
    for g in report["groups"]:
        assert re.search(rf"\| {g['group']} \| {re.escape(g['tower'])} \| {g['layer']} \| [^|]*{g['kind']} \|[^|]*\| {g['kept']} \| {g['total']} \|", md)
    for tower, t in report["towers"].items():
        assert f"| {tower} | {t['kept_fraction']:.4f} |" in md
    assert report["cli"]["source"] == str(minilm_path().resolve())


@pytest.fixture
def command(monkeypatch, capsys):
    """``command(argv, cwd) -> (exit code, stdout, stderr)``: ``upop-fx`` run in this process, in ``cwd``; the
    logger level and progress setting it changes are restored."""
    from upop_fx import logs
    from upop_fx.cli import main

    monkeypatch.setattr(logs, "_bars", logs._bars)
    logger = logging.getLogger("upop_fx")
    level = logger.level

    def run(argv: list[str], cwd: Path) -> tuple[int, str, str]:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: a usage error, or --help
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    logger.setLevel(level)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compress", "/nonexistent/model", "--ratio", "0.5", "--out", "o"], "neither a model directory"),
        (["compress", "MODEL", "--ratio", "0.5", "--out", "o", "--method", "random"], "invalid choice: 'random'"),
        (["compress", "MODEL", "--ratio", "1.5", "--out", "o"], "ratio must be a number in [0, 1), got 1.5"),
        (["compress", "MODEL", "--out", "o", "--runtime", "torch-cpu"], "belong to budget='latency'"),
        (["compress", "MODEL", "--out", "o", "--budget", "latency", "--latency-shape", "8x128"], "BATCH,SEQ"),
        (["compress", "MODEL", "--ratio", "0.5", "--out", "taken"], "exists and is not empty"),
        (["bench", "nowhere"], "no report.json"),
        (["compress", "MODEL", "--out", "o", "--retrain-score", "nowhere:score"], "cannot import 'nowhere:score'"),
    ],
)
def test_bad_input_exits_with_one_line(tmp_path, argv, message, command):
    """In process (the entry point itself runs in the documented commands above): the same ``main``."""
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    argv = [str(minilm_path()) if a == "MODEL" else a for a in argv]
    code, _, err = command(argv, tmp_path)
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("upop-fx")]
    assert len(lines) == 1 and message in lines[0], err[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # nothing half-written
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_a_callable_option_is_read_as_module_colon_function():
    from tests import scaleout
    from upop_fx.cli import _options_of, _parser

    args = _parser().parse_args(["compress", "MODEL", "--out", "o", "--retrain-score", "tests.scaleout:summary"])
    assert _options_of(args).retrain_score is scaleout.summary


def test_help_explains_every_option(command, tmp_path):
    """Every field of Options is a flag, shown with its doc (the one explanation of the option)."""
    import dataclasses

    code, out, _ = command(["compress", "--help"], tmp_path)
    assert code == 0
    help_text = " ".join(out.split())
    for f in dataclasses.fields(upop_fx.Options):
        assert "--" + f.name.replace("_", "-") in help_text
        if not f.metadata["cli"]:  # verbose: the command's own -v / -q say it for the command line
            continue
        assert " ".join(f.metadata["doc"].split())[:40] in help_text, f.name
    for opt in ("--out", "--data", "examples:", "search options", "latency options"):
        assert opt in out
