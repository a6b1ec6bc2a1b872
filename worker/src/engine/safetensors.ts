/**
 * Reading safetensors bytes: a single file or shards named by model.safetensors.index.json. Tensors are converted
 * row-block by row-block to f32 straight into a caller-provided Float32Array (bf16 / f16 / f32 sources).
 */

export class CheckpointError extends Error {
  constructor(readonly tensor: string, message: string) {
    super(`checkpoint tensor ${tensor}: ${message}`);
    this.name = 'CheckpointError';
  }
}

export type Bytes = ArrayBuffer | Uint8Array;

export interface TensorInfo {
  name: string;
  dtype: string;
  shape: number[];
  bytes: Uint8Array; // exactly this tensor's data
}

const DTYPE_SIZE: Record<string, number> = { F32: 4, BF16: 2, F16: 2 };

function asU8(b: Bytes): Uint8Array {
  return b instanceof Uint8Array ? b : new Uint8Array(b);
}

/** Parses one safetensors file's header; the tensor data is not copied. */
export function readSafetensors(buf: Bytes, fileName = 'model.safetensors'): Map<string, TensorInfo> {
  const u8 = asU8(buf);
  if (u8.byteLength < 8) throw new Error(`${fileName}: too short for a safetensors header`);
  const dv = new DataView(u8.buffer, u8.byteOffset, u8.byteLength);
  const n = Number(dv.getBigUint64(0, true));
  if (8 + n > u8.byteLength) throw new Error(`${fileName}: header length ${n} exceeds the file`);
  let header: Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
  try {
    header = JSON.parse(new TextDecoder().decode(u8.subarray(8, 8 + n)));
  } catch (e) {
    throw new Error(`${fileName}: invalid header JSON (${(e as Error).message})`);
  }
  const out = new Map<string, TensorInfo>();
  const base = 8 + n;
  for (const [name, h] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const [a, b] = h.data_offsets;
    if (base + b > u8.byteLength || a > b) throw new CheckpointError(name, `data offsets [${a}, ${b}] outside ${fileName}`);
    out.set(name, { name, dtype: h.dtype, shape: h.shape, bytes: u8.subarray(base + a, base + b) });
  }
  return out;
}

/** Sharded checkpoints: index.json's weight_map names the shard of every tensor. */
export function readShardedSafetensors(index: string | object, shards: Record<string, Bytes>): Map<string, TensorInfo> {
  const idx = (typeof index === 'string' ? JSON.parse(index) : index) as { weight_map?: Record<string, string> };
  if (!idx.weight_map) throw new Error('model.safetensors.index.json: missing weight_map');
  const parsed = new Map<string, Map<string, TensorInfo>>();
  const out = new Map<string, TensorInfo>();
  for (const [name, file] of Object.entries(idx.weight_map)) {
    if (!parsed.has(file)) {
      const bytes = shards[file];
      if (!bytes) throw new CheckpointError(name, `its shard ${file} was not provided`);
      parsed.set(file, readSafetensors(bytes, file));
    }
    const t = parsed.get(file)!.get(name);
    if (!t) throw new CheckpointError(name, `listed in the index but absent from ${file}`);
    out.set(name, t);
  }
  return out;
}

/**
 * Converts rows [row0, row0 + nrows) of a 2-D (or 1-D, rows = 1) tensor to f32 into `dst`.
 * `cols` is the row length the caller expects (already checked against the shape).
 */
export function rowsToF32(t: TensorInfo, row0: number, nrows: number, cols: number, dst: Float32Array): void {
  const size = DTYPE_SIZE[t.dtype];
  if (!size) throw new CheckpointError(t.name, `unsupported dtype ${t.dtype} (expected BF16, F16 or F32)`);
  const n = nrows * cols;
  const start = row0 * cols * size;
  const src = t.bytes.subarray(start, start + n * size);
  if (src.byteLength !== n * size) throw new CheckpointError(t.name, 'data shorter than its shape');
  // Typed views need aligned offsets; copy the slice when the file does not align it.
  const aligned = src.byteOffset % size === 0 ? src : src.slice();
  if (t.dtype === 'F32') {
    dst.set(new Float32Array(aligned.buffer, aligned.byteOffset, n));
  } else if (t.dtype === 'BF16') {
    const h = new Uint16Array(aligned.buffer, aligned.byteOffset, n);
    const out = new Uint32Array(dst.buffer, dst.byteOffset, n);
    for (let i = 0; i < n; i++) out[i] = h[i] << 16;
  } else {
    const h = new Uint16Array(aligned.buffer, aligned.byteOffset, n);
    for (let i = 0; i < n; i++) dst[i] = f16ToF32(h[i]);
  }
}

function f16ToF32(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}
