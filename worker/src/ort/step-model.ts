/**
 * The exported step graph (gpu-backend/ringlinear/export) driven through onnxruntime-web.
 *
 * One graph serves prefill and decode: it takes T new tokens, the position, and every linear layer's state and
 * softmax layer's KV cache, and returns logits for the T tokens plus the new states. Long prompts are fed in
 * chunks so the T x T attention inside a chunk stays bounded.
 */
import type * as OrtNS from 'onnxruntime-web';

export type Ort = typeof OrtNS;
type Tensor = OrtNS.Tensor;

/** The `<model>.json` the exporter writes beside the `.onnx`. */
export interface StepMeta {
  format: 'ringlinear-onnx-step/1';
  inputs: string[];
  outputs: string[];
  vocab_size: number;
  max_context: number;
  num_attention_heads: number;
  num_key_value_heads: number;
  head_dim: number;
  linear_layers: number[];
  softmax_layers: number[];
  eos_token_ids: number[];
}

export function parseStepMeta(json: unknown): StepMeta {
  const m = json as Partial<StepMeta> | null;
  if (!m || typeof m !== 'object' || m.format !== 'ringlinear-onnx-step/1') {
    throw new Error('ONNX metadata: expected format "ringlinear-onnx-step/1" (the .json written by `ringlinear export-onnx`)');
  }
  for (const k of ['vocab_size', 'max_context', 'num_attention_heads', 'num_key_value_heads', 'head_dim'] as const) {
    if (!Number.isInteger(m[k]) || (m[k] as number) <= 0) throw new Error(`ONNX metadata: field ${k} must be a positive integer`);
  }
  for (const k of ['inputs', 'outputs', 'linear_layers', 'softmax_layers', 'eos_token_ids'] as const) {
    if (!Array.isArray(m[k])) throw new Error(`ONNX metadata: field ${k} must be an array`);
  }
  return m as StepMeta;
}

/** Per-sequence state: tokens consumed plus the graph's state tensors keyed by input name. */
export interface StepState {
  pos: number;
  tensors: Record<string, Tensor>;
}

export interface StepResult {
  /** Row-major [T, V] logits of the fed tokens (only the last row when `lastOnly`). */
  logits: Float32Array;
  state: StepState;
}

/** Which output feeds which state input on the next call. */
function stateOutputFor(input: string): string {
  if (input.startsWith('state_')) return `state_out_${input.slice('state_'.length)}`;
  if (input.startsWith('past_key_')) return `present_key_${input.slice('past_key_'.length)}`;
  if (input.startsWith('past_value_')) return `present_value_${input.slice('past_value_'.length)}`;
  throw new Error(`ONNX metadata: unexpected state input ${input}`);
}

export class OrtStepModel {
  private readonly stateInputs: string[];
  private queue: Promise<unknown> = Promise.resolve();

  private constructor(
    private readonly ort: Ort,
    private readonly session: OrtNS.InferenceSession,
    readonly meta: StepMeta,
  ) {
    this.stateInputs = meta.inputs.slice(2);
    const missing = meta.inputs.filter((n) => !session.inputNames.includes(n));
    if (missing.length) throw new Error(`ONNX graph lacks input(s) named by its metadata: ${missing.join(', ')}`);
  }

  /** Creates the session single-threaded (the edge has one core; workerd has no threads). */
  static async create(ort: Ort, modelBytes: Uint8Array, meta: StepMeta): Promise<OrtStepModel> {
    ort.env.wasm.numThreads = 1;
    ort.env.wasm.proxy = false;
    const session = await ort.InferenceSession.create(modelBytes, {
      executionProviders: ['wasm'],
      graphOptimizationLevel: 'all',
    });
    return new OrtStepModel(ort, session, meta);
  }

  /** Zero linear states and empty KV caches. */
  initialState(): StepState {
    const { num_attention_heads: H, num_key_value_heads: Hkv, head_dim: d } = this.meta;
    const tensors: Record<string, Tensor> = {};
    for (const name of this.stateInputs) {
      tensors[name] = name.startsWith('state_')
        ? new this.ort.Tensor('float32', new Float32Array(H * d * d), [H, d, d])
        : new this.ort.Tensor('float32', new Float32Array(0), [Hkv, 0, d]);
    }
    return { pos: 0, tensors };
  }

  /** Bytes one sequence of `tokens` tokens holds in states and KV (the engine's per-request budget). */
  stateBytes(tokens: number): number {
    const { num_attention_heads: H, num_key_value_heads: Hkv, head_dim: d } = this.meta;
    return 4 * (this.meta.linear_layers.length * H * d * d + this.meta.softmax_layers.length * 2 * Hkv * tokens * d);
  }

  /**
   * Feeds `ids` after `state` (left untouched) in chunks of at most `chunk` tokens. Runs are serialised: one
   * session runs one graph at a time, and concurrent requests interleave between calls.
   */
  async forward(ids: number[], state: StepState, opts: { chunk?: number; lastOnly?: boolean } = {}): Promise<StepResult> {
    if (ids.length === 0) throw new Error('forward: no tokens');
    const V = this.meta.vocab_size;
    for (const id of ids) {
      if (!Number.isInteger(id) || id < 0 || id >= V) throw new Error(`forward: token id ${id} outside the vocabulary [0, ${V})`);
    }
    if (state.pos + ids.length > this.meta.max_context) {
      throw new Error(`forward: ${state.pos + ids.length} tokens exceed the exported context of ${this.meta.max_context}`);
    }
    const chunk = Math.max(1, opts.chunk ?? 64);
    const logits = new Float32Array(opts.lastOnly ? V : ids.length * V);
    let cur = state;
    for (let s = 0; s < ids.length; s += chunk) {
      const part = ids.slice(s, s + chunk);
      const { logits: l, state: next } = await this.serial(() => this.run(part, cur));
      if (opts.lastOnly) {
        if (s + part.length === ids.length) logits.set(l.subarray((part.length - 1) * V));
      } else {
        logits.set(l, s * V);
      }
      cur = next;
    }
    return { logits, state: cur };
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.queue.then(fn, fn);
    this.queue = p.catch(() => undefined);
    return p;
  }

  private async run(ids: number[], state: StepState): Promise<StepResult> {
    const feeds: Record<string, Tensor> = {
      input_ids: new this.ort.Tensor('int64', BigInt64Array.from(ids, (x) => BigInt(x)), [ids.length]),
      position: new this.ort.Tensor('int64', BigInt64Array.of(BigInt(state.pos)), [1]),
    };
    for (const name of this.stateInputs) feeds[name] = state.tensors[name];
    const out = await this.session.run(feeds);
    const tensors: Record<string, Tensor> = {};
    for (const name of this.stateInputs) tensors[name] = out[stateOutputFor(name)];
    return { logits: out.logits.data as Float32Array, state: { pos: state.pos + ids.length, tensors } };
  }

  async release(): Promise<void> {
    await this.session.release();
  }
}
