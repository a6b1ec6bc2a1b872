/**
 * config.json (bailing_moe_linear) -> the kernel's configuration. Every check names the offending field.
 * Defaults follow the HF BailingMoeV2 config class where the architecture doc gives one.
 */
import { type KernelConfig, QUANT_F32, QUANT_INT8 } from './kernel';

export class ConfigError extends Error {
  constructor(readonly field: string, message: string) {
    super(`config.json: ${field}: ${message}`);
    this.name = 'ConfigError';
  }
}

export interface ModelConfig {
  kernel: KernelConfig;
  tieWordEmbeddings: boolean;
  expertBias: boolean;
  eosTokenIds: number[];
  maxPositions: number;
}

type Json = Record<string, unknown>;

function num(c: Json, field: string, dflt?: number): number {
  const v = c[field];
  if (v === undefined || v === null) {
    if (dflt === undefined) throw new ConfigError(field, 'missing');
    return dflt;
  }
  if (typeof v !== 'number' || !Number.isFinite(v)) throw new ConfigError(field, `expected a number, got ${JSON.stringify(v)}`);
  return v;
}

function int(c: Json, field: string, dflt?: number, min = 0): number {
  const v = num(c, field, dflt);
  if (!Number.isInteger(v) || v < min) throw new ConfigError(field, `expected an integer >= ${min}, got ${v}`);
  return v;
}

function bool(c: Json, field: string, dflt: boolean): boolean {
  const v = c[field];
  if (v === undefined || v === null) return dflt;
  if (typeof v !== 'boolean') throw new ConfigError(field, `expected a boolean, got ${JSON.stringify(v)}`);
  return v;
}

export function parseJson(text: string | object, what: string): Json {
  if (typeof text !== 'string') return text as Json;
  try {
    return JSON.parse(text) as Json;
  } catch (e) {
    throw new Error(`${what}: invalid JSON (${(e as Error).message})`);
  }
}

function ids(v: unknown): number[] {
  if (typeof v === 'number') return [v];
  if (Array.isArray(v)) return v.filter((x): x is number => typeof x === 'number');
  return [];
}

/**
 * @param quant 'f32' or 'int8' for the large matrices
 * @param maxChunk tokens per kernel call during prefill
 * @param maxContext positions a session may hold (KV cache bound), already capped by the caller's budget
 */
export function parseModelConfig(
  text: string | object,
  opts: { quant: 'f32' | 'int8'; maxChunk: number; maxContext: number; generationConfig?: Json },
): ModelConfig {
  const c = parseJson(text, 'config.json');
  if (c.model_type !== 'bailing_moe_linear')
    throw new ConfigError('model_type', `expected "bailing_moe_linear", got ${JSON.stringify(c.model_type)}`);
  if (c.score_function !== undefined && c.score_function !== 'sigmoid')
    throw new ConfigError('score_function', `only "sigmoid" is supported, got ${JSON.stringify(c.score_function)}`);
  if (c.rope_scaling !== undefined && c.rope_scaling !== null)
    throw new ConfigError('rope_scaling', 'RoPE scaling is not supported by the edge engine');
  const act = c.hidden_act ?? 'silu';
  if (act !== 'silu') throw new ConfigError('hidden_act', `only "silu" is supported, got ${JSON.stringify(act)}`);
  const rule = c.ringlinear_slope_rule ?? 'sglang';
  if (rule !== 'sglang' && rule !== 'hf')
    throw new ConfigError('ringlinear_slope_rule', `expected "sglang" or "hf", got ${JSON.stringify(rule)}`);

  const dim = int(c, 'hidden_size', undefined, 1);
  const nHeads = int(c, 'num_attention_heads', undefined, 1);
  const headDim = int(c, 'head_dim', Math.floor(dim / nHeads), 1);
  const rotDim =
    c.rotary_dim !== undefined && c.rotary_dim !== null
      ? int(c, 'rotary_dim')
      : Math.floor(headDim * num(c, 'partial_rotary_factor', 0.5));
  if (rotDim % 2 !== 0 || rotDim > headDim) throw new ConfigError('partial_rotary_factor', `rotary dim ${rotDim} must be even and <= head_dim`);
  const nExperts = int(c, 'num_experts', 0);
  const moeInter = int(c, 'moe_intermediate_size', 0);
  const nShared = int(c, 'num_shared_experts', 0);
  const sharedInter = nShared * int(c, 'moe_shared_expert_intermediate_size', moeInter);
  const eos = ids(opts.generationConfig?.eos_token_id);
  const kernel: KernelConfig = {
    vocab: int(c, 'vocab_size', undefined, 1),
    dim,
    nLayers: int(c, 'num_hidden_layers', undefined, 1),
    layerGroupSize: int(c, 'layer_group_size', undefined, 1),
    nHeads,
    nKvHeads: int(c, 'num_key_value_heads', nHeads, 1),
    headDim,
    rotDim,
    groupNormSize: int(c, 'group_norm_size', 1, 1),
    inter: int(c, 'intermediate_size', 0),
    firstDense: int(c, 'first_k_dense_replace', 0),
    nExperts,
    topk: int(c, 'num_experts_per_tok', nExperts > 0 ? undefined : 0),
    nGroup: int(c, 'n_group', 1, 1),
    topkGroup: int(c, 'topk_group', 1, 1),
    moeInter,
    sharedInter,
    normTopkProb: bool(c, 'norm_topk_prob', true) ? 1 : 0,
    useQkNorm: bool(c, 'use_qk_norm', false) ? 1 : 0,
    linearSilu: bool(c, 'linear_silu', false) ? 1 : 0,
    slopeRuleHf: rule === 'hf' ? 1 : 0,
    quant: opts.quant === 'int8' ? QUANT_INT8 : QUANT_F32,
    maxChunk: opts.maxChunk,
    maxContext: Math.min(opts.maxContext, int(c, 'max_position_embeddings', opts.maxContext, 1)),
    ropeTheta: num(c, 'rope_theta', 1e6),
    rmsEps: num(c, 'rms_norm_eps', 1e-6),
    routedScale: num(c, 'routed_scaling_factor', 1.0),
  };
  if (kernel.nHeads % kernel.nKvHeads !== 0) throw new ConfigError('num_key_value_heads', 'must divide num_attention_heads');
  if ((nHeads * headDim) % kernel.groupNormSize !== 0) throw new ConfigError('group_norm_size', 'must divide num_attention_heads*head_dim');
  if (nExperts > 0 && nExperts % kernel.nGroup !== 0) throw new ConfigError('n_group', 'must divide num_experts');
  return {
    kernel,
    tieWordEmbeddings: bool(c, 'tie_word_embeddings', false),
    expertBias: bool(c, 'moe_router_enable_expert_bias', true),
    eosTokenIds: eos.length ? eos : ids(c.eos_token_id),
    maxPositions: int(c, 'max_position_embeddings', 4096, 1),
  };
}
