/**
 * Thin typed wrapper over the C kernel's exports (wasm/src/api.c). It owns one model and hands out sessions.
 * Every call that may allocate (create, session, malloc) can grow wasm memory, so typed-array views are always
 * taken fresh from `memory.buffer` right before use, never cached.
 */

/** Tensor kinds, same order as the enum in wasm/include/model.h. */
export const TensorKind = {
  EMBED: 0, FINAL_NORM: 1, LM_HEAD: 2, IN_NORM: 3, POST_NORM: 4, QKV: 5, Q_NORM: 6, K_NORM: 7, G_PROJ: 8, G_NORM: 9,
  DENSE: 10, MLP_GATE: 11, MLP_UP: 12, MLP_DOWN: 13, ROUTER: 14, EXPERT_BIAS: 15, EXP_GATE: 16, EXP_UP: 17,
  EXP_DOWN: 18, SH_GATE: 19, SH_UP: 20, SH_DOWN: 21,
} as const;
export const TENSOR_KIND_COUNT = 22;

/** The C `rl_config`: 24 int32 fields then 3 float32 fields, in this order. */
export interface KernelConfig {
  vocab: number; dim: number; nLayers: number; layerGroupSize: number; nHeads: number; nKvHeads: number;
  headDim: number; rotDim: number; groupNormSize: number; inter: number; firstDense: number; nExperts: number;
  topk: number; nGroup: number; topkGroup: number; moeInter: number; sharedInter: number; normTopkProb: number;
  useQkNorm: number; linearSilu: number; slopeRuleHf: number; quant: number; maxChunk: number; maxContext: number;
  ropeTheta: number; rmsEps: number; routedScale: number;
}
const INT_FIELDS: (keyof KernelConfig)[] = [
  'vocab', 'dim', 'nLayers', 'layerGroupSize', 'nHeads', 'nKvHeads', 'headDim', 'rotDim', 'groupNormSize', 'inter',
  'firstDense', 'nExperts', 'topk', 'nGroup', 'topkGroup', 'moeInter', 'sharedInter', 'normTopkProb', 'useQkNorm',
  'linearSilu', 'slopeRuleHf', 'quant', 'maxChunk', 'maxContext',
];
const FLOAT_FIELDS: (keyof KernelConfig)[] = ['ropeTheta', 'rmsEps', 'routedScale'];
/** Field order for the native benchmark's command line (same struct). */
export const KERNEL_CONFIG_ORDER = [...INT_FIELDS, ...FLOAT_FIELDS];

export const QUANT_F32 = 0;
export const QUANT_INT8 = 1;

interface Exports {
  memory: WebAssembly.Memory;
  _initialize?: () => void;
  rl_error_message(): number;
  rl_malloc(n: number): number;
  rl_free(p: number): void;
  rl_create(cfg: number): number;
  rl_destroy(m: number): void;
  rl_model_bytes(m: number): number;
  rl_n_linear(m: number): number;
  rl_n_softmax(m: number): number;
  rl_layer_gamma(m: number, layer: number, head: number): number;
  rl_tensor_shape(m: number, kind: number, layer: number, expert: number, out: number): number;
  rl_load_rows(m: number, kind: number, layer: number, expert: number, row0: number, nrows: number, src: number): number;
  rl_fill_random(m: number, seed: number): number;
  rl_session_bytes(m: number, capacity: number): number;
  rl_session_create(m: number, capacity: number): number;
  rl_session_free(s: number): void;
  rl_session_pos(s: number): number;
  rl_session_state(s: number, m: number, j: number): number;
  rl_forward(m: number, s: number, tokens: number, T: number): number;
  rl_logits(m: number, row: number): number;
}

export class KernelError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'KernelError';
  }
}

/** Instantiates the precompiled kernel module (workerd forbids compiling wasm at runtime). */
export async function instantiateKernel(module: WebAssembly.Module): Promise<Kernel> {
  const imports = { env: { emscripten_notify_memory_growth: () => {} } };
  const instance = await WebAssembly.instantiate(module, imports);
  const ex = instance.exports as unknown as Exports;
  ex._initialize?.();
  return new Kernel(ex);
}

export class Kernel {
  private model = 0;
  private staging = 0;
  private stagingFloats = 0;
  private tokenBuf = 0;
  private tokenCap = 0;
  cfg!: KernelConfig;

  constructor(private readonly ex: Exports) {}

  get memoryBytes(): number {
    return this.ex.memory.buffer.byteLength;
  }

  private errorText(): string {
    const p = this.ex.rl_error_message();
    const bytes = new Uint8Array(this.ex.memory.buffer, p, 256);
    const end = bytes.indexOf(0);
    return new TextDecoder().decode(bytes.subarray(0, end < 0 ? 256 : end));
  }

  private malloc(n: number): number {
    const p = this.ex.rl_malloc(n);
    if (!p) throw new KernelError(`wasm out of memory allocating ${n} bytes`);
    return p;
  }

  createModel(cfg: KernelConfig): void {
    if (this.model) throw new KernelError('kernel already holds a model');
    const p = this.malloc(4 * (INT_FIELDS.length + FLOAT_FIELDS.length));
    const i32 = new Int32Array(this.ex.memory.buffer, p, INT_FIELDS.length);
    INT_FIELDS.forEach((k, i) => (i32[i] = cfg[k]));
    const f32 = new Float32Array(this.ex.memory.buffer, p + 4 * INT_FIELDS.length, FLOAT_FIELDS.length);
    FLOAT_FIELDS.forEach((k, i) => (f32[i] = cfg[k]));
    this.model = this.ex.rl_create(p);
    this.ex.rl_free(p);
    if (!this.model) throw new KernelError(this.errorText());
    this.cfg = { ...cfg };
    this.tokenCap = cfg.maxChunk;
    this.tokenBuf = this.malloc(4 * this.tokenCap);
  }

  /** Bytes of weights + activation scratch + model struct inside wasm memory. */
  modelBytes(): number {
    return this.ex.rl_model_bytes(this.model) >>> 0;
  }
  sessionBytes(capacity: number): number {
    return this.ex.rl_session_bytes(this.model, capacity) >>> 0;
  }
  nLinear(): number {
    return this.ex.rl_n_linear(this.model);
  }
  layerGamma(layer: number, head: number): number {
    return this.ex.rl_layer_gamma(this.model, layer, head);
  }

  /** [rows, cols, isInt8], or null when this config has no such tensor. */
  tensorShape(kind: number, layer: number, expert: number): [number, number, boolean] | null {
    const p = this.malloc(12);
    const ok = this.ex.rl_tensor_shape(this.model, kind, layer, expert, p);
    const v = new Int32Array(this.ex.memory.buffer, p, 3);
    const r: [number, number, boolean] = [v[0], v[1], v[2] === 1];
    this.ex.rl_free(p);
    return ok ? r : null;
  }

  /** A reusable f32 staging area in wasm memory for loading rows. */
  stagingView(floats: number): { ptr: number; view: Float32Array } {
    if (floats > this.stagingFloats) {
      if (this.staging) this.ex.rl_free(this.staging);
      this.staging = this.malloc(4 * floats);
      this.stagingFloats = floats;
    }
    return { ptr: this.staging, view: new Float32Array(this.ex.memory.buffer, this.staging, floats) };
  }

  releaseStaging(): void {
    if (this.staging) this.ex.rl_free(this.staging);
    this.staging = 0;
    this.stagingFloats = 0;
  }

  loadRows(kind: number, layer: number, expert: number, row0: number, nrows: number, src: number): void {
    if (this.ex.rl_load_rows(this.model, kind, layer, expert, row0, nrows, src) !== 0)
      throw new KernelError(this.errorText());
  }

  fillRandom(seed: number): void {
    this.ex.rl_fill_random(this.model, seed >>> 0);
  }

  createSession(capacity: number): number {
    const s = this.ex.rl_session_create(this.model, capacity);
    if (!s) throw new KernelError(this.errorText());
    return s;
  }
  freeSession(s: number): void {
    this.ex.rl_session_free(s);
  }
  sessionPos(s: number): number {
    return this.ex.rl_session_pos(s);
  }
  /** Copy of the [H, d, d] state of the j-th linear layer. */
  sessionState(s: number, j: number): Float32Array {
    const n = this.cfg.nHeads * this.cfg.headDim * this.cfg.headDim;
    const p = this.ex.rl_session_state(s, this.model, j);
    return new Float32Array(this.ex.memory.buffer, p, n).slice();
  }

  /** Runs up to maxChunk tokens through the model; rows of this call become available to logitsInto. */
  forward(s: number, tokens: ArrayLike<number>): void {
    if (tokens.length > this.tokenCap) throw new KernelError('forward: more tokens than maxChunk');
    new Int32Array(this.ex.memory.buffer, this.tokenBuf, tokens.length).set(tokens);
    if (this.ex.rl_forward(this.model, s, this.tokenBuf, tokens.length) !== 0) throw new KernelError(this.errorText());
  }

  /** Logits [V] of a row of the last forward call, copied out (the kernel buffer is reused). */
  logits(row: number, out?: Float32Array<ArrayBuffer>): Float32Array<ArrayBuffer> {
    const p = this.ex.rl_logits(this.model, row);
    if (!p) throw new KernelError(this.errorText());
    const v = new Float32Array(this.ex.memory.buffer, p, this.cfg.vocab);
    if (out) {
      out.set(v);
      return out;
    }
    return v.slice();
  }

  destroy(): void {
    this.releaseStaging();
    if (this.tokenBuf) this.ex.rl_free(this.tokenBuf);
    if (this.model) this.ex.rl_destroy(this.model);
    this.model = 0;
    this.tokenBuf = 0;
  }
}
