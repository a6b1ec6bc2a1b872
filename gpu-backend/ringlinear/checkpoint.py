"""Reading and writing Hugging Face checkpoint directories of BailingMoeLinearV2 models.

A checkpoint directory holds config.json and model.safetensors, or model-0000i-of-0000n.safetensors with
model.safetensors.index.json. Every tensor is checked (name, shape, dtype) before the model is built, so an
error never leaves a half-loaded model behind. Errors name the file and tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ConfigError, RingLinearConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LOADABLE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Checkpoint names that differ from the module's parameter names: routed experts are stored one tensor per expert,
# held stacked [E, ...]; some checkpoints of the family call the router bias e_score_correction_bias.
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_BIAS_ALIAS = re.compile(r"^(model\.layers\.\d+\.mlp\.gate)\.e_score_correction_bias$")
# Buffers some exporters write but nothing reads: the decay slopes and rotary frequencies follow from the config.
_IGNORED = re.compile(r"(slope|inv_freq)")


class CheckpointError(ValueError):
    """The checkpoint directory cannot be loaded; the message names the file and tensor at fault."""


def _canonical(name: str) -> str:
    return _BIAS_ALIAS.sub(r"\1.expert_bias", name)


def map_name(name: str) -> tuple[str, int | None]:
    """Checkpoint tensor name -> (module parameter name, expert index or None)."""
    m = _EXPERT.match(name)
    if m:
        return f"{m.group(1)}.experts_{m.group(3)}", int(m.group(2))
    return _canonical(name), None


def expected_tensors(cfg: RingLinearConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config must hold, with its shape (architecture doc §6)."""
    D, H, Hkv, d, V = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.d_head, cfg.vocab_size
    out: dict[str, tuple[int, ...]] = {"model.word_embeddings.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}"
        out[f"{p}.input_layernorm.weight"] = (D,)
        out[f"{p}.post_attention_layernorm.weight"] = (D,)
        a = f"{p}.attention"
        out[f"{a}.query_layernorm.weight"] = (d,)
        out[f"{a}.key_layernorm.weight"] = (d,)
        out[f"{a}.dense.weight"] = (D, H * d)
        if cfg.is_softmax_layer(l):
            out[f"{a}.query_key_value.weight"] = ((H + 2 * Hkv) * d, D)
        else:
            out[f"{a}.query_key_value.weight"] = (3 * H * d, D)
            out[f"{a}.g_proj.weight"] = (H * d, D)
            out[f"{a}.g_norm.weight"] = (H * d,)
        m = f"{p}.mlp"
        if cfg.is_dense_layer(l):
            I = cfg.intermediate_size
            out.update({f"{m}.gate_proj.weight": (I, D), f"{m}.up_proj.weight": (I, D), f"{m}.down_proj.weight": (D, I)})
            continue
        I, S = cfg.moe_intermediate_size, cfg.shared_intermediate
        out[f"{m}.gate.weight"] = (cfg.num_experts, D)
        if cfg.moe_router_enable_expert_bias:
            out[f"{m}.gate.expert_bias"] = (cfg.num_experts,)
        for e in range(cfg.num_experts):
            x = f"{m}.experts.{e}"
            out.update({f"{x}.gate_proj.weight": (I, D), f"{x}.up_proj.weight": (I, D), f"{x}.down_proj.weight": (D, I)})
        if S:
            x = f"{m}.shared_experts"
            out.update({f"{x}.gate_proj.weight": (S, D), f"{x}.up_proj.weight": (S, D), f"{x}.down_proj.weight": (D, S)})
    return out


def _shard_files(ckpt: Path) -> dict[str, Path]:
    """tensor name -> file, from the index (sharded) or the single file's header."""
    index = ckpt / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"bad {INDEX_FILE} in {ckpt}: {e}") from None
        files = {}
        for name, fname in weight_map.items():
            path = ckpt / fname
            if not path.exists():
                raise CheckpointError(f"{INDEX_FILE} maps {name} to {fname}, which is missing from {ckpt}")
            files[name] = path
        return files
    single = ckpt / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {ckpt}")
    with _open(single) as f:
        return {name: single for name in f.keys()}


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path.name}: {e} (truncated or not a safetensors file?)") from None


def _placed(name: str, t: torch.Tensor, dtype: torch.dtype | None, device: torch.device | None) -> torch.Tensor:
    """t on `device` in `dtype` (None: as stored); the router's expert bias stays fp32 (it sets the expert choice)."""
    if device is None and dtype is None:
        return t
    keep_fp32 = name.endswith("expert_bias")
    return t.to(device=device, dtype=torch.float32 if keep_fp32 else (dtype or t.dtype))


def read_state_dict(ckpt: str | Path, cfg: RingLinearConfig, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, validated against `cfg`, in the module's naming (experts stacked), in `dtype` on
    `device` (None: as stored, on the host). Each tensor moves to the device as it is read and an expert stack is built
    there once its last expert is in, so the host holds one tensor at a time, not the checkpoint (Ring-mini is 33 GB
    in bf16) - and the device holds one stack's parts twice at most."""
    ckpt = Path(ckpt)
    device = None if device is None else torch.device(device)
    expected = expected_tensors(cfg)
    files = _shard_files(ckpt)
    stored = {_canonical(n): n for n in files if not _IGNORED.search(n)}  # checkpoint name -> name as stored
    unexpected = sorted(n for n in stored if n not in expected)
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) in {ckpt}: {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
    missing = [n for n in expected if n not in stored]
    if missing:
        raise CheckpointError(f"missing tensor {missing[0]} in {ckpt}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    by_file: dict[Path, list[str]] = {}
    for name, as_stored in stored.items():
        by_file.setdefault(files[as_stored], []).append(name)
    experts: dict[str, list[torch.Tensor | None]] = {}
    filled: dict[str, int] = {}  # experts read so far per stack (each name is read once)
    out: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        with _open(path) as f:
            for name in names:
                try:
                    t = f.get_tensor(stored[name])
                except (SafetensorError, OSError, RuntimeError) as e:
                    raise CheckpointError(f"cannot read tensor {name} from {path.name}: {e} (truncated file?)") from None
                if tuple(t.shape) != expected[name]:
                    raise CheckpointError(f"tensor {name}: shape mismatch, expected {list(expected[name])}, got {list(t.shape)}")
                if t.dtype not in LOADABLE_DTYPES:
                    raise CheckpointError(f"tensor {name}: dtype {t.dtype} is not loadable (bf16, fp16 or fp32)")
                target, e = map_name(name)
                t = _placed(name, t, dtype, device)
                if e is None:
                    out[target] = t
                    continue
                parts = experts.setdefault(target, [None] * cfg.num_experts)
                parts[e] = t
                filled[target] = filled.get(target, 0) + 1
                if filled[target] == cfg.num_experts:
                    out[target] = torch.stack(parts)
                    del experts[target]
    assert not experts, f"expert stacks left incomplete: {sorted(experts)}"  # `expected` lists every expert
    return out


def load_model(ckpt: str | Path, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu"):
    """Build the reference model from a checkpoint directory. dtype None keeps the checkpoint's dtype."""
    from .model import RingLinearForCausalLM

    ckpt = Path(ckpt)
    try:
        cfg = RingLinearConfig.from_file(ckpt)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    sd = read_state_dict(ckpt, cfg, dtype=dtype, device=device)
    with torch.device("meta"):
        model = RingLinearForCausalLM(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def save_checkpoint(out_dir: str | Path, cfg: RingLinearConfig, tensors: dict[str, torch.Tensor], shards: int = 1) -> None:
    """Write config.json and the tensors (checkpoint names) as one file or `shards` files with an index."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    names = list(tensors)
    if shards <= 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(out / SINGLE_FILE), metadata={"format": "pt"})
        return
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i * per:(i + 1) * per]}
        save_file(part, str(out / fname), metadata={"format": "pt"})
        for n, t in part.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
