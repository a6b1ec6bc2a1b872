"""`python -m ringlinear train <subcommand>`: the default model's pipeline, each step one command.

    tokenizer   train the BPE tokenizer on DATA/train.jsonl          -> DIR/tokenizer*.json, generation_config.json
    encode      encode DATA/{train,heldout}.jsonl                     -> DATA/{train,heldout}.npy (uint16)
    run         train a model from scratch                            -> OUT/ (HF checkpoint + tokenizer) + train_log.jsonl
    perplexity  held-out perplexity of a checkpoint (reference model, fp32, any device)
    sample      greedy and sampled continuations of prompts
    golden      held-out text sample + per-token NLL for cross-engine checks -> JSON
    plot        loss curves of a train_log.jsonl                      -> SVG

tools/data/prepare.sh runs corpus building, `tokenizer` and `encode`; docs/model-card.md lists the full recipe.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from .configs import CONFIGS, model_config


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    return name


def cmd_tokenizer(a) -> None:
    from .data import read_jsonl_texts
    from .tokenizer_train import train_tokenizer, write_tokenizer_files

    tok = train_tokenizer(read_jsonl_texts(Path(a.data) / "train.jsonl"), a.vocab_size)
    write_tokenizer_files(tok, a.out, a.model_max_length)
    print(f"{a.out}: vocab {tok.get_vocab_size()}")


def cmd_encode(a) -> None:
    import numpy as np
    from tokenizers import Tokenizer

    from .data import encode_documents, read_jsonl_texts

    tok = Tokenizer.from_file(str(Path(a.tokenizer) / "tokenizer.json"))
    for split in ("train", "heldout"):
        ids = encode_documents(tok, read_jsonl_texts(Path(a.data) / f"{split}.jsonl"))
        np.save(Path(a.data) / f"{split}.npy", ids)
        print(f"{split}: {len(ids)} tokens")


def cmd_run(a) -> None:
    from tokenizers import Tokenizer

    from .data import load_tokens
    from .loop import TrainSettings, train

    tok_path = Path(a.tokenizer) / "tokenizer.json"
    if not tok_path.exists():
        raise SystemExit(f"{tok_path} not found: run tools/data/prepare.sh (or `train tokenizer`) first")
    vocab = Tokenizer.from_file(str(tok_path)).get_vocab_size()
    cfg = model_config(a.config, vocab_size=vocab)
    s = TrainSettings(seq_len=a.seq_len, batch_size=a.batch_size, lr=a.lr, warmup_steps=a.warmup, steps=a.steps,
                      time_budget_s=a.time_budget, seed=a.seed, amp=not a.no_amp, log_every=a.log_every,
                      eval_every=a.eval_every, bias_update_rate=a.bias_rate, save_dtype=a.save_dtype,
                      shards=a.shards)
    heldout = Path(a.data) / "heldout.npy"
    _, summary = train(cfg, load_tokens(Path(a.data) / "train.npy"), load_tokens(heldout) if heldout.exists() else None,
                       a.out, s, device=_device(a.device), tokenizer_dir=a.tokenizer, log_path=a.log, progress=not a.no_progress)
    print(json.dumps(summary))


def _heldout(a):
    from .data import heldout_windows, load_tokens

    return heldout_windows(load_tokens(Path(a.data) / "heldout.npy"), a.seq_len, a.windows)


def cmd_perplexity(a) -> None:
    from ..checkpoint import load_model
    from .evaluate import perplexity

    device = _device(a.device)
    model = load_model(a.model, dtype=torch.float32, device=device)
    res = perplexity(model, _heldout(a), a.batch_size)
    res.update({"model": str(a.model), "device": device, "dtype": "float32"})
    print(json.dumps(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")


def cmd_sample(a) -> None:
    from ..checkpoint import load_model
    from ..tokenizer import ChatTokenizer
    from .evaluate import generate

    model = load_model(a.model, dtype=torch.float32, device=_device(a.device))
    tok = ChatTokenizer(a.model)
    for prompt in a.prompt:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}]) if a.chat else prompt
        ids = tok.encode(text)
        for label, temp in (("greedy", 0.0), (f"sampled T={a.temperature} top_p={a.top_p}", a.temperature)):
            out = generate(model, ids, a.max_new, tok.eos_ids, temperature=temp, top_p=a.top_p, seed=a.seed)
            print(json.dumps({"prompt": text, "mode": label, "completion": tok.decode(out)}, ensure_ascii=False))


def cmd_golden(a) -> None:
    """A short held-out text and the reference's per-token NLL, for engines without a Python stack."""
    from ..checkpoint import load_model
    from ..tokenizer import ChatTokenizer
    from .data import load_tokens
    from .evaluate import token_nll

    tok = ChatTokenizer(a.model)
    stream = load_tokens(Path(a.data) / "heldout.npy")
    ids = [int(t) for t in stream[: a.tokens]]
    model = load_model(a.model, dtype=torch.float32)
    nll = token_nll(model, torch.tensor([ids]))[0]
    doc = {
        "about": "Held-out sample of the default model's corpus (first tokens of the held-out stream) and the CPU reference's "
                 "per-token NLL. nll[i] = -log p(ids[i+1] | ids[:i+1]) from an empty state, fp32 weights loaded from the "
                 "bf16 checkpoint; engines compare their NLL per token (tolerance below) and the mean.",
        "model": "models/default",
        "text": tok.tok.decode(ids, skip_special_tokens=False),
        "ids": ids,
        "nll": [round(float(x), 6) for x in nll],
        "mean_nll": float(nll.mean()),
        "perplexity": math.exp(float(nll.mean())),
        "tolerances": {"f32_abs_per_token": 1e-3, "int8_abs_mean_nll": 0.05},
    }
    Path(a.out).write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{a.out}: {len(ids)} tokens, mean NLL {doc['mean_nll']:.4f}, ppl {doc['perplexity']:.2f}")


def cmd_plot(a) -> None:
    from .plot import loss_svg, read_load, read_log

    if a.what == "load":
        Path(a.out).write_text(loss_svg(read_load(a.log), a.title, ylabel="max / mean expert load"), encoding="utf-8")
        print(a.out)
        return
    train, heldout = read_log(a.log)
    series = {"train loss": train}
    if heldout:
        series["held-out loss"] = heldout
    Path(a.out).write_text(loss_svg(series, a.title), encoding="utf-8")
    print(a.out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="ringlinear train", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("tokenizer", help="train the BPE tokenizer")
    t.add_argument("--data", required=True, help="folder with train.jsonl")
    t.add_argument("--out", required=True)
    t.add_argument("--vocab-size", type=int, default=6144)
    t.add_argument("--model-max-length", type=int, default=4096)
    t.set_defaults(fn=cmd_tokenizer)

    e = sub.add_parser("encode", help="encode train/heldout JSONL to uint16 .npy")
    e.add_argument("--data", required=True)
    e.add_argument("--tokenizer", required=True, help="folder with tokenizer.json")
    e.set_defaults(fn=cmd_encode)

    r = sub.add_parser("run", help="train a model")
    r.add_argument("--data", required=True, help="folder with train.npy (and heldout.npy)")
    r.add_argument("--tokenizer", required=True, help="folder with the tokenizer files (copied into --out)")
    r.add_argument("--out", required=True)
    r.add_argument("--config", default="default", choices=sorted(CONFIGS))
    r.add_argument("--device", default="auto")
    r.add_argument("--seq-len", type=int, default=512)
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--lr", type=float, default=2e-3)
    r.add_argument("--warmup", type=int, default=100)
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--steps", type=int)
    g.add_argument("--time-budget", type=float, help="seconds of training; steps are fixed after calibration")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--bias-rate", type=float, default=1e-3, help="expert-bias balancing step")
    r.add_argument("--log-every", type=int, default=10)
    r.add_argument("--eval-every", type=int, default=200)
    r.add_argument("--log", help="loss log path (default OUT/train_log.jsonl)")
    r.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    r.add_argument("--shards", type=int, default=1, help="write N safetensors shards + index")
    r.add_argument("--no-amp", action="store_true", help="train in fp32 (no bf16 autocast)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(fn=cmd_run)

    for name, fn, help_ in (("perplexity", cmd_perplexity, "held-out perplexity"), ("golden", cmd_golden, "held-out NLL golden file")):
        q = sub.add_parser(name, help=help_)
        q.add_argument("--model", required=True)
        q.add_argument("--data", required=True, help="folder with heldout.npy")
        q.set_defaults(fn=fn)
    pp = sub.choices["perplexity"]
    pp.add_argument("--device", default="cpu")
    pp.add_argument("--seq-len", type=int, default=512)
    pp.add_argument("--windows", type=int, default=64, help="first N windows of the held-out stream")
    pp.add_argument("--batch-size", type=int, default=8)
    pp.add_argument("--json", help="also write the result here")
    gg = sub.choices["golden"]
    gg.add_argument("--tokens", type=int, default=256)
    gg.add_argument("--out", required=True)

    sm = sub.add_parser("sample", help="greedy and sampled continuations")
    sm.add_argument("--model", required=True)
    sm.add_argument("--prompt", action="append", required=True)
    sm.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    sm.add_argument("--max-new", type=int, default=60)
    sm.add_argument("--temperature", type=float, default=0.8)
    sm.add_argument("--top-p", type=float, default=0.95)
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--device", default="cpu")
    sm.set_defaults(fn=cmd_sample)

    pl = sub.add_parser("plot", help="loss curves as SVG")
    pl.add_argument("--log", required=True)
    pl.add_argument("--out", required=True)
    pl.add_argument("--title", default="Ring-linear default model: training loss")
    pl.add_argument("--what", default="loss", choices=["loss", "load"], help="loss curves or per-layer expert load balance")
    pl.set_defaults(fn=cmd_plot)

    a = p.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    main(sys.argv[1:])
