/**
 * Checkpoint names (architecture doc §6) -> kernel tensors. Every tensor the config requires must be present with
 * exactly the expected shape; errors name the tensor. Rows are streamed through a small staging area so a tensor is
 * never held twice in f32.
 */
import type { ModelConfig } from './config';
import { type Kernel, TensorKind as K } from './kernel';
import { CheckpointError, type TensorInfo, rowsToF32 } from './safetensors';

const VECTOR_KINDS = new Set<number>([K.FINAL_NORM, K.IN_NORM, K.POST_NORM, K.Q_NORM, K.K_NORM, K.G_NORM, K.EXPERT_BIAS]);

function layerName(kind: number, l: number, e: number): string {
  const p = `model.layers.${l}`;
  switch (kind) {
    case K.IN_NORM: return `${p}.input_layernorm.weight`;
    case K.POST_NORM: return `${p}.post_attention_layernorm.weight`;
    case K.QKV: return `${p}.attention.query_key_value.weight`;
    case K.Q_NORM: return `${p}.attention.query_layernorm.weight`;
    case K.K_NORM: return `${p}.attention.key_layernorm.weight`;
    case K.G_PROJ: return `${p}.attention.g_proj.weight`;
    case K.G_NORM: return `${p}.attention.g_norm.weight`;
    case K.DENSE: return `${p}.attention.dense.weight`;
    case K.MLP_GATE: return `${p}.mlp.gate_proj.weight`;
    case K.MLP_UP: return `${p}.mlp.up_proj.weight`;
    case K.MLP_DOWN: return `${p}.mlp.down_proj.weight`;
    case K.ROUTER: return `${p}.mlp.gate.weight`;
    case K.EXPERT_BIAS: return `${p}.mlp.gate.expert_bias`;
    case K.EXP_GATE: return `${p}.mlp.experts.${e}.gate_proj.weight`;
    case K.EXP_UP: return `${p}.mlp.experts.${e}.up_proj.weight`;
    case K.EXP_DOWN: return `${p}.mlp.experts.${e}.down_proj.weight`;
    case K.SH_GATE: return `${p}.mlp.shared_experts.gate_proj.weight`;
    case K.SH_UP: return `${p}.mlp.shared_experts.up_proj.weight`;
    case K.SH_DOWN: return `${p}.mlp.shared_experts.down_proj.weight`;
  }
  throw new Error(`no checkpoint name for tensor kind ${kind}`);
}

interface Slot { kind: number; layer: number; expert: number; name: string; rows: number; cols: number }

/** Every tensor the kernel expects for this config, with its checkpoint name and shape. */
export function expectedTensors(kernel: Kernel, cfg: ModelConfig): Slot[] {
  const out: Slot[] = [];
  const add = (kind: number, layer: number, expert: number, name: string) => {
    const shp = kernel.tensorShape(kind, layer, expert);
    if (shp) out.push({ kind, layer, expert, name, rows: shp[0], cols: shp[1] });
  };
  add(K.EMBED, -1, -1, 'model.word_embeddings.weight');
  add(K.FINAL_NORM, -1, -1, 'model.norm.weight');
  add(K.LM_HEAD, -1, -1, cfg.tieWordEmbeddings ? 'model.word_embeddings.weight' : 'lm_head.weight');
  const { nLayers, nExperts } = cfg.kernel;
  for (let l = 0; l < nLayers; l++)
    for (let kind: number = K.IN_NORM; kind <= K.SH_DOWN; kind++) {
      if (kind === K.EXPERT_BIAS && !cfg.expertBias) continue; // stays zero
      const perExpert = kind === K.EXP_GATE || kind === K.EXP_UP || kind === K.EXP_DOWN;
      if (perExpert) for (let e = 0; e < nExperts; e++) add(kind, l, e, layerName(kind, l, e));
      else add(kind, l, -1, layerName(kind, l, -1));
    }
  return out;
}

function findTensor(tensors: Map<string, TensorInfo>, name: string): TensorInfo | undefined {
  const t = tensors.get(name);
  if (t) return t;
  // Some checkpoints of the family name the router bias e_score_correction_bias.
  if (name.endsWith('.mlp.gate.expert_bias')) return tensors.get(name.replace('expert_bias', 'e_score_correction_bias'));
  return undefined;
}

const STAGING_FLOATS = 1 << 16; // 256 KiB of f32 rows per kernel call

/** Checks every expected tensor, then streams all of them into the kernel (f32 copy or int8 quantisation). */
export function loadWeights(kernel: Kernel, cfg: ModelConfig, tensors: Map<string, TensorInfo>): void {
  const slots = expectedTensors(kernel, cfg);
  const found = slots.map((s) => {
    const t = findTensor(tensors, s.name);
    if (!t) throw new CheckpointError(s.name, 'missing from the checkpoint');
    const want = VECTOR_KINDS.has(s.kind) ? [s.cols] : [s.rows, s.cols];
    if (t.shape.length !== want.length || t.shape.some((v, i) => v !== want[i]))
      throw new CheckpointError(s.name, `shape [${t.shape}] does not match the config, expected [${want}]`);
    return t;
  });
  try {
    slots.forEach((s, i) => {
      const t = found[i];
      const rowsPerCall = Math.max(1, Math.floor(STAGING_FLOATS / s.cols));
      for (let r0 = 0; r0 < s.rows; r0 += rowsPerCall) {
        const n = Math.min(rowsPerCall, s.rows - r0);
        const { ptr, view } = kernel.stagingView(Math.max(STAGING_FLOATS, s.cols));
        rowsToF32(t, r0, n, s.cols, view);
        kernel.loadRows(s.kind, s.layer, s.expert, r0, n, ptr);
      }
    });
  } finally {
    kernel.releaseStaging();
  }
}
